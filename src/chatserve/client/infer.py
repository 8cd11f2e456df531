"""The original demo's stream_test.py, on httpx: post a chat to /infer and print what streams back."""

from __future__ import annotations

import json
import sys

import httpx

DEMO_MESSAGES = [{"role": "user", "content": "Hello, how are you?"}, {"role": "user", "content": "What can you do?"}]


def infer_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/infer") else url + "/infer"


def run(url: str = "http://127.0.0.1:8000", model: str = "dummy_model", text_only: bool = False,
        max_tokens: int | None = None) -> int:
    payload = {"model": model, "messages": DEMO_MESSAGES, "stream": True}
    if max_tokens is not None:
        payload["max_tokens"] = max_tokens
    # No read timeout would hang on a stuck server; a generous one still allows slow models.
    timeout = httpx.Timeout(10.0, read=300.0)
    try:
        with httpx.stream("POST", infer_url(url), json=payload, timeout=timeout) as response:
            if response.status_code != 200:
                response.read()
                try:
                    message = response.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = response.text
                print(f"Request failed with status code {response.status_code}: {message}", file=sys.stderr)
                return 1
            if not text_only:
                print("Response received successfully", flush=True)
            for line in response.iter_lines():
                if not line:
                    continue
                data = json.loads(line)
                if text_only:
                    print(data["choices"][0]["message"]["content"], end="", flush=True)
                else:
                    # As the demo shows them: the raw bytes, then the parsed dict.
                    print(f"Raw line: {line.encode()}")
                    print(f"Received: {data}", flush=True)
    except httpx.HTTPError as exc:
        print(f"error: could not reach {infer_url(url)}: {exc}", file=sys.stderr)
        return 1
    if text_only:
        print()
    return 0
