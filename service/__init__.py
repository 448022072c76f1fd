"""normserve's inference service: FastAPI + onnxruntime, Open Inference Protocol (V2) and V1."""

import os

# onnxruntime 1.32 on Linux collects usage telemetry by default: it writes a device ID and a
# multi-MB event store under ~/.cache/Microsoft and uploads to Microsoft, which a server in a
# closed network or on a read-only root file system should not attempt. Opted out before the
# first onnxruntime import; setting ORT_DISABLE_TELEMETRY=0 turns it back on.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
