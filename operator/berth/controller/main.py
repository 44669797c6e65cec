"""`berth operator`: run the ModelDeployment operator (kopf) with the BERTH_* settings."""

from __future__ import annotations

import argparse
import logging
import random

from berth.controller.settings import get_settings

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="berth operator",
        description="Run the ModelDeployment operator. Settings come from BERTH_* environment variables.",
    )
    parser.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)

    settings = get_settings()  # validated once, before anything starts
    namespaces = args.namespace or settings.namespaces
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import kopf
    from prometheus_client import start_http_server

    from berth.controller import apikey_handlers, handlers  # noqa: F401  (registers the handlers)
    from berth.controller.context import MEMO_KEY, OperatorContext

    if settings.metrics_port:
        start_http_server(settings.metrics_port)
        log.info("metrics on :%d/metrics", settings.metrics_port)
    log.info(
        "berth operator starting: %s, peering %s",
        f"namespaces {', '.join(namespaces)}" if namespaces else "cluster-wide",
        settings.peering or "off (standalone)",
    )
    priority = settings.peering_priority or random.randint(1, 2**31 - 1)
    context = OperatorContext.create(settings, namespaces=list(namespaces), priority=priority)
    kopf.run(
        memo=kopf.Memo({MEMO_KEY: context}),
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=not settings.peering,
        peering_name=settings.peering or None,
        priority=priority if settings.peering else None,
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
    )
    return 0
