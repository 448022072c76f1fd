"""``python -m service.healthcheck [PATH]``: exit 0 when this server answers PATH with 200.

PATH defaults to ``/v2/health/ready``; ``/v2/health/live`` checks liveness only.

The container HEALTHCHECK runs it, because the slim runtime image has no curl or wget. It
uses only the standard library (no pydantic, no onnxruntime) so that each probe starts in
tens of milliseconds, and it reads the same ``NORMSERVE_PORT`` the server listens on.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    port = os.environ.get("NORMSERVE_PORT", "8000")
    endpoint = argv[0] if argv else "/v2/health/ready"
    url = f"http://127.0.0.1:{port}{endpoint}"
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            status: int = response.status
    except urllib.error.HTTPError as exc:  # 503 while loading or draining
        print(f"unhealthy: {url} answered {exc.code}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # refused, timed out, bad port
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
