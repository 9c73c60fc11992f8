#!/bin/sh
# Run redis-server as the redis user on every interface of the container, data in /data.
set -eu
mkdir -p /data
chown redis:redis /data
set -- --bind 0.0.0.0 --protected-mode no --dir /data --appendonly yes --save "" "$@"
if [ -n "${REDIS_PASSWORD:-}" ]; then
    set -- "$@" --requirepass "$REDIS_PASSWORD"
fi
exec setpriv --reuid=redis --regid=redis --init-groups redis-server "$@"
