# The gateway image: CPU only, no torch and no CUDA (the gateway imports none of the engine's
# runtime; tests/test_packaging.py and the no-torch test prove it). Build from the repository
# root:  docker build -f docker/gateway.Dockerfile -t loraplex-gateway:0.1.0 .
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE* ./
COPY loraplex ./loraplex
COPY engine ./engine
COPY gateway ./gateway
COPY adapters ./adapters
COPY tenancy ./tenancy
COPY admin ./admin
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
# the chart runs every container as 10001 with a read-only root filesystem
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /var/lib/loraplex loraplex
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
ENV LORAPLEX_DATA_DIR=/var/lib/loraplex PYTHONUNBUFFERED=1
EXPOSE 8000
ENTRYPOINT ["loraplex"]
CMD ["gateway", "--host=0.0.0.0"]
