# PostgreSQL 15 from Debian's packages, built without a registry by `ferry image build
# --all`: BASE is a debootstrapped bookworm with postgresql-15 and redis-server. It reads
# the same variables as the official image: POSTGRES_PASSWORD (required on first start),
# POSTGRES_USER (postgres), POSTGRES_DB (= user), PGDATA (/var/lib/postgresql/data).
ARG BASE
FROM ${BASE}
COPY entrypoint.sh /usr/local/bin/ferry-postgres
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PGDATA=/var/lib/postgresql/data \
    LANG=C.UTF-8
LABEL ferry.image=postgres
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/ferry-postgres"]
