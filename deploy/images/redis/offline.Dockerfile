# Redis 7 from Debian's packages, built without a registry by `ferry image build --all`:
# BASE is a debootstrapped bookworm with postgresql-15 and redis-server. Data and the
# append-only file go to /data; REDIS_PASSWORD, when set, is required of clients.
ARG BASE
FROM ${BASE}
COPY entrypoint.sh /usr/local/bin/ferry-redis
LABEL ferry.image=redis
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/ferry-redis"]
