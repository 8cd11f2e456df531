"""The original demo's client: stream a chat from /infer with requests and print each line.

    python stream_test.py [URL]     (or CHATSERVE_URL=...; default http://127.0.0.1:8000)
"""

import json
import os
import sys

import requests

base = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("CHATSERVE_URL", "http://127.0.0.1:8000")
url = base.rstrip("/") if base.rstrip("/").endswith("/infer") else base.rstrip("/") + "/infer"
data = {
    "model": "dummy_model",
    "messages": [
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "user", "content": "What can you do?"},
    ],
    "stream": True,
}

response = requests.post(url, json=data, stream=True, timeout=(10, 300))
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
