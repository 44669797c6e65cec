"""`berth gateway`: parse flags into the settings, start the watches and the usage flusher, serve."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from berth.gateway.app import Gateway, create_app
from berth.gateway.registry import Instance, Registry
from berth.gateway.settings import GatewaySettings, MasterKey

log = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> GatewaySettings:
    p = argparse.ArgumentParser(
        prog="berth gateway", description="one OpenAI endpoint for every Berth instance"
    )
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--replicas", type=int, help="gateway replicas (each enforces its share of a quota)")
    p.add_argument(
        "--namespace", action="append", dest="namespaces", help="watch only this namespace (repeatable)"
    )
    p.add_argument("--master-key-file", type=Path)
    p.add_argument("--usage-flush-seconds", type=float)
    p.add_argument("--max-attempts", type=int)
    p.add_argument("--keepalive-seconds", type=float)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    if "namespaces" in args:
        args["namespaces"] = tuple(args["namespaces"])
    return GatewaySettings(**args)


def build(settings: GatewaySettings) -> tuple[Any, Gateway]:
    timeout = httpx.Timeout(settings.read_timeout_seconds, connect=settings.connect_timeout_seconds)
    client = httpx.AsyncClient(
        timeout=timeout, limits=httpx.Limits(max_connections=None, max_keepalive_connections=1024)
    )
    master = MasterKey(  # re-read when the file changes
        settings.master_key_file,
        settings.master_key(),
        grace_seconds=settings.previous_master_key_grace_seconds,
    )
    gw = Gateway(settings, Registry(), client, master=master)
    app = create_app(gw)
    if not settings.kubernetes:
        return app, gw
    from berth.gateway import kube

    api = kube.load_config()
    watcher = kube.Watcher(api, gw.registry, settings.namespaces)
    waker = kube.Waker(api)

    async def wake(instance: Instance) -> None:
        await asyncio.to_thread(waker.wake, instance)

    gw.waker = wake

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        watcher.start()
        await asyncio.to_thread(watcher.wait_synced, 30.0)

        async def flusher() -> None:
            while True:
                await asyncio.sleep(settings.usage_flush_seconds)
                await asyncio.to_thread(kube.flush_usage, api, gw.usage)

        task = asyncio.create_task(flusher())
        try:
            yield
        finally:
            task.cancel()
            watcher.stop.set()
            await asyncio.to_thread(kube.flush_usage, api, gw.usage)
            await client.aclose()

    app.router.lifespan_context = lifespan
    return app, gw


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = parse_args(list(argv or []))
    app, _ = build(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False)
    return 0
