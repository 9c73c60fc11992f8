#!/bin/sh
# HAProxy on :8700 in front of FERRY_API_SERVERS (space-separated host:port). Names are
# resolved through Docker's DNS at run time, so an API container may start later or be
# replaced; /healthz takes a server out within two seconds of it stopping to answer.
set -eu
servers="${FERRY_API_SERVERS:-api-1:8700 api-2:8700}"
config=/tmp/haproxy.cfg
cat >"$config" <<CFG
global
    maxconn 4096
defaults
    mode http
    option http-server-close
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    retries 2
    option redispatch
resolvers docker
    parse-resolv-conf
    hold valid 1s
frontend api
    bind :8700
    default_backend ferry
backend ferry
    balance roundrobin
    option httpchk GET /healthz
CFG
i=0
for server in $servers; do
    i=$((i + 1))
    echo "    server api$i $server check inter 1s fall 2 rise 1 resolvers docker init-addr last,libc,none" >>"$config"
done
exec haproxy -W -db -f "$config"
