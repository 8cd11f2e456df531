"""The original demo's client: stream a chat from /infer with requests and print each line.

    python stream_test.py [URL]     (or CHATSERVE_URL=...; default http://127.0.0.1:8000)

It asks for the model the server serves (GET /v1/models; 'dummy_model', as the original demo did,
from a server without that route) and sends $CHATSERVE_API_KEY when it is set.
"""

import json
import os
import sys

import requests

base = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("CHATSERVE_URL", "http://127.0.0.1:8000")
base = base.rstrip("/").removesuffix("/infer")
url = base + "/infer"
headers = {"Authorization": f"Bearer {os.environ['CHATSERVE_API_KEY']}"} if os.environ.get("CHATSERVE_API_KEY") else {}


def served_model() -> str:
    try:
        models = requests.get(base + "/v1/models", headers=headers, timeout=10)
        return models.json()["data"][0]["id"] if models.status_code == 200 else "dummy_model"
    except (requests.RequestException, ValueError, KeyError, IndexError, TypeError):
        return "dummy_model"


data = {
    "model": served_model(),
    "messages": [
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "user", "content": "What can you do?"},
    ],
    "stream": True,
}

response = requests.post(url, json=data, headers=headers, stream=True, timeout=(10, 300))
if response.status_code == 200:
    print("Response received successfully")
    for line in response.iter_lines():
        if line:
            print(f"Raw line: {line}")
            try:
                print(f"Received: {json.loads(line)}")
            except json.JSONDecodeError as e:
                print(f"Failed to decode JSON: {e}")
else:
    print(f"Request failed with status code {response.status_code}: {response.text}")
    sys.exit(1)
