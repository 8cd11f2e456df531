"""The original demo's stream_test.py, on httpx: post a chat to /infer and print what streams back."""

from __future__ import annotations

import json
import sys
from typing import Optional

import httpx

from ..config import DEFAULT_MODEL

DEMO_MESSAGES = [{"role": "user", "content": "Hello, how are you?"}, {"role": "user", "content": "What can you do?"}]


def infer_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/infer") else url + "/infer"


def served_model(url: str, headers: dict, timeout: float = 10.0) -> str:
    """The name the server serves, from GET /v1/models; 'dummy_model' from a server without that
    route (the original demo's, which serves only /infer) or one that cannot say."""
    base = infer_url(url).removesuffix("/infer")
    try:
        response = httpx.get(f"{base}/v1/models", headers=headers, timeout=timeout)
        return response.json()["data"][0]["id"] if response.status_code == 200 else DEFAULT_MODEL
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return DEFAULT_MODEL


def run(url: str = "http://127.0.0.1:8000", model: Optional[str] = None, api_key: Optional[str] = None,
        text_only: bool = False, max_tokens: Optional[int] = None) -> int:
    """model None: the one the server serves. api_key: sent as 'Authorization: Bearer KEY'."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    payload = {"model": model or served_model(url, headers), "messages": DEMO_MESSAGES, "stream": True}
    if max_tokens is not None:
        payload["max_tokens"] = max_tokens
    # No read timeout would hang on a stuck server; a generous one still allows slow models.
    timeout = httpx.Timeout(10.0, read=300.0)
    try:
        with httpx.stream("POST", infer_url(url), json=payload, headers=headers, timeout=timeout) as response:
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
