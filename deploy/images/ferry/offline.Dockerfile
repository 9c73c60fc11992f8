# Ferry itself, built without a registry by `ferry image build --all`: BASE is the offline
# runner image (Debian's Python 3.11 from debootstrap, see docs/images.md) and wheels/ holds
# Ferry's wheel and every dependency's, made on the host with pip, so nothing is downloaded
# here. Keep in step with deploy/images/ferry/Dockerfile.
ARG BASE
FROM ${BASE}

USER root
COPY wheels /tmp/ferry-wheels
RUN python3 -m pip install --no-index --find-links /tmp/ferry-wheels --no-cache-dir \
        --break-system-packages --root-user-action=ignore --disable-pip-version-check \
        --no-warn-script-location --progress-bar off 'ferry[server]' \
 && rm -rf /tmp/ferry-wheels

ENV FERRY_API_HOST=0.0.0.0 \
    FERRY_METRICS_HOST=0.0.0.0 \
    FERRY_DATA_DIR=/var/lib/ferry \
    FERRY_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8

LABEL ferry.image=server
WORKDIR /
EXPOSE 8700 8701 8702
ENTRYPOINT ["ferry"]
CMD ["api"]
