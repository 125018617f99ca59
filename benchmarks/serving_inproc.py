"""The gateway with its engine in a thread of the same process (``InprocEngineClient``):
what one ``loraplex serve`` worker runs, without the engine process and its ZeroMQ hops.

Settings come from ``LORAPLEX_*`` as for ``loraplex serve``; it migrates, bootstraps
(printing the first-start banner), then serves with uvicorn until SIGTERM. For the
benchmarks (``bench_gateway_overhead.py --variants inproc``), not a way to deploy.

    LORAPLEX_MODEL=dummy:tiny LORAPLEX_DEVICE=cpu python benchmarks/serving_inproc.py
"""

from __future__ import annotations

import uvicorn

from loraplex.engine_wiring import inproc_engine
from loraplex.gateway.app import create_app
from loraplex.gateway.http_protocol import http_protocol
from loraplex.gateway.log_format import logging_config
from loraplex.serve import load_settings, migrate, resolve_model, run_bootstrap


def main() -> None:
    settings = load_settings()
    model = resolve_model(settings.model)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings)
    banner = run_bootstrap(settings).banner()
    if banner:
        print(banner, flush=True)
    app = create_app(settings, engine_factory=lambda: inproc_engine(settings, model))
    # as `loraplex serve` runs its workers (loraplex.supervisor): loraplex's log config, and
    # no uvicorn access line (gateway.request_log writes the request's line)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info",
                log_config=logging_config(settings.log_format), access_log=False,
                http=http_protocol())  # fmt: skip


if __name__ == "__main__":
    main()
