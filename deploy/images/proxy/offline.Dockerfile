# HAProxy from Debian's packages in front of the API processes, built without a registry by
# `ferry image build --all`: BASE is the debootstrapped bookworm with haproxy.
ARG BASE
FROM ${BASE}
COPY entrypoint.sh /usr/local/bin/ferry-proxy
LABEL ferry.image=proxy
EXPOSE 8700
ENTRYPOINT ["/usr/local/bin/ferry-proxy"]
