"""Container HEALTHCHECK: exit 0 when the v2 server answers /v2/health/ready with 200, else 1.

Stdlib only (runs in the image's python3); the port is $EDGEML_HTTP_PORT (default 8000).
"""

import os
import sys
import urllib.error
import urllib.request

PORT = int(os.environ.get("EDGEML_HTTP_PORT", "8000"))

try:
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/v2/health/ready", timeout=2) as response:
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError) as exc:
    print(f"not ready: {exc}", file=sys.stderr)
    sys.exit(1)
