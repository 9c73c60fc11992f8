#!/usr/bin/env python3
"""Print a fresh env file for deploy/compose.yaml: every secret random, nothing else needed.

    python3 deploy/make-env.py > deploy/ferry.env && chmod 600 deploy/ferry.env

Every Ferry process on every host must read the same FERRY_SECRET_KEY (it decrypts service
secrets) and the same database and Redis URLs; see docs/deploy.md.
"""

import base64
import os
import secrets

postgres = secrets.token_urlsafe(24)
redis = secrets.token_urlsafe(24)
print(f"""\
# Ferry's secrets for deploy/compose.yaml (keep this file mode 0600, back it up).
FERRY_SECRET_KEY={base64.urlsafe_b64encode(os.urandom(32)).decode()}
FERRY_METRICS_TOKEN={secrets.token_urlsafe(24)}
POSTGRES_PASSWORD={postgres}
REDIS_PASSWORD={redis}
FERRY_DATABASE_URL=postgresql://ferry:{postgres}@postgres:5432/ferry
FERRY_REDIS_URL=redis://:{redis}@redis:6379/0
""")
