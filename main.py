"""`uvicorn main:app --reload` from the repo root, as in the original demo.

The model comes from CHATSERVE_MODEL (default dummy_model); every other EngineConfig field from
CHATSERVE_<FIELD> (CHATSERVE_DEVICE, CHATSERVE_DTYPE, CHATSERVE_NUM_KV_BLOCKS, ...), the server's
from CHATSERVE_API_KEY, CHATSERVE_API_KEY_FILE, CHATSERVE_CORS_ORIGINS, CHATSERVE_MAX_QUEUE,
CHATSERVE_MODEL_ALIASES, CHATSERVE_ALLOWED_HOSTS, CHATSERVE_BODY_TIMEOUT. `chatserve serve --help`
explains each setting. The bound on reading a request's headers lives in uvicorn's protocol: add
`--http chatserve.server.connection:HeaderTimeoutProtocol` (CHATSERVE_HEADER_TIMEOUT, default 10 s).
"""

import logging
import os

from chatserve.server.app import configs_from_env, create_app

# uvicorn configures only its own loggers; without this the engine's and requests' lines are lost.
logging.basicConfig(level=os.environ.get("CHATSERVE_LOG_LEVEL", "info").upper(),
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")

app = create_app(*configs_from_env())
