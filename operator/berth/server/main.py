"""`berth serve`: run the inference server.

Lifecycle: the HTTP server starts at once (``/health/live`` answers while the model loads); the
model is loaded in a worker thread, the engine started, one warm-up generation run, and only then
does ``/health/ready`` turn true. On SIGTERM (or Ctrl-C) the server drains: ``/health/ready``
turns false, new generation requests get 503, in-flight ones finish (up to ``--drain-timeout``
seconds), then the process exits 0. A model that cannot be loaded exits 1 with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from types import FrameType
from typing import Any

from berth.server.auth import KeyStore
from berth.server.settings import ServerSettings, settings_from_args

log = logging.getLogger(__name__)


def configure_logging(level: str) -> None:
    """Plain lines on stderr; the access log as one JSON object per line on stdout."""
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    access = logging.getLogger("berth.access")
    access.handlers.clear()
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(out)
    access.setLevel(logging.INFO)
    access.propagate = False


class Runtime:
    """Owns the process lifecycle: load -> warm up -> ready -> (SIGTERM) drain -> exit."""

    def __init__(self, settings: ServerSettings) -> None:
        import uvicorn

        from berth.server.app import Phase, ServerState, create_app

        self.settings = settings
        keys = KeyStore(settings.api_key_dir, settings.api_keys)
        if not keys.enabled:
            log.warning("no API keys configured (--api-key-dir / BERTH_API_KEYS): authentication is OFF")
        self.state = ServerState(settings=settings, keys=keys)
        self.state.set_phase(Phase.LOADING)
        self._phase = Phase
        self.engine: Any = None
        self._drain_requested_at: float | None = None
        self.app = create_app(self.state, on_startup=self._startup, on_shutdown=self._shutdown)
        config = uvicorn.Config(
            self.app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
            timeout_graceful_shutdown=5,
            log_config=None,
        )
        runtime = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: FrameType | None) -> None:
                runtime.on_signal(sig)

        self.server = _Server(config)

    # ---------------------------------------------------------------- signals and draining

    def on_signal(self, sig: int) -> None:
        """Signal handler: the first SIGTERM/SIGINT starts draining; a second SIGINT exits now."""
        if self._drain_requested_at is None:
            self._drain_requested_at = time.monotonic()
        elif sig == signal.SIGINT:
            self.server.force_exit = True
            self.server.should_exit = True

    async def _drain_watch(self) -> None:
        while self._drain_requested_at is None:
            await asyncio.sleep(0.05)
        started = self._drain_requested_at
        if self.state.phase is not self._phase.FAILED:
            self.state.set_phase(self._phase.DRAINING)
        if self.engine is not None:
            self.engine.drain()
        log.info(
            "draining: %d request(s) in flight, up to %.0f s to finish",
            self.state.in_flight,
            self.settings.drain_timeout,
        )
        while self.state.in_flight > 0 and time.monotonic() - started < self.settings.drain_timeout:
            await asyncio.sleep(0.05)
        if self.state.in_flight:
            log.warning("drain timeout: %d request(s) still in flight are cut off", self.state.in_flight)
        else:
            log.info("drained; shutting down")
        self.server.should_exit = True

    # ----------------------------------------------------------------------- load / warm-up

    def _build_engine(self) -> Any:
        from berth.server.engine import Engine, EngineConfig
        from berth.server.loader import load_model

        s = self.settings
        if s.threads != "auto":  # before the weights load; auto is timed once the engine's runner exists
            from berth.server.engine.runner.threads import set_threads

            set_threads(int(s.threads))
        model = load_model(
            s.model,
            served_name=s.served_model_name,
            dtype=s.dtype,
            device=s.device,
            max_model_len=s.max_model_len,
            adapters=s.adapter_map(),
            backend=s.backend,
            trust_remote_code=s.trust_remote_code,
        )
        config = EngineConfig(
            max_num_seqs=s.max_num_seqs,
            max_queue=s.max_queue,
            max_num_batched_tokens=s.max_num_batched_tokens,
            kv_cache_memory_fraction=s.kv_cache_memory_fraction,
            kv_cache_cpu_gib=s.kv_cache_cpu_gib,
            cuda_graphs=s.cuda_graphs,
            weight_format=s.weight_format,
            release_packed_weights=True,  # the model was loaded for this engine alone
            threads=s.threads,
        )
        engine = Engine(model, config)
        engine.start()
        return engine

    async def _startup(self) -> None:
        watcher = asyncio.create_task(self._drain_watch())
        try:
            await self._load()
            await watcher
        finally:
            watcher.cancel()

    async def _load(self) -> None:
        from berth.server.serving import Serving

        started = time.monotonic()
        log.info("loading model %s", self.settings.model)
        try:
            self.engine = await asyncio.to_thread(self._build_engine)
            serving = Serving(self.engine, self.settings, self.state.metrics)
            self.state.metrics.bind_engine(self.engine, self.engine.model_info)
            if self.settings.warmup:
                text = await serving.warm_up()
                log.info("warm-up generation done (%r)", text)
        except Exception as exc:
            self.state.load_error = f"{type(exc).__name__}: {exc}"
            self.state.set_phase(self._phase.FAILED)
            log.error("cannot load model %s: %s", self.settings.model, exc)
            log.debug("load failure", exc_info=True)
            self.server.should_exit = True
            return
        self.state.serving = serving
        info = serving.info
        if self._drain_requested_at is None:
            self.state.set_phase(self._phase.READY)
        log.info(
            "ready in %.1f s: serving %s (%s backend, %s on %s, max_model_len %d%s) at http://%s:%d",
            time.monotonic() - started,
            info.served_name,
            info.backend,
            info.dtype,
            info.device,
            info.max_model_len,
            f", adapters {list(info.adapters)}" if info.adapters else "",
            self.settings.host,
            self.settings.port,
        )

    async def _shutdown(self) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)

    def run(self) -> int:
        self.server.run()
        if self.state.load_error is not None:
            print(
                f"berth serve: cannot load model {self.settings.model}: {self.state.load_error}",
                file=sys.stderr,
            )
            return 1
        return 0


def main(argv: list[str]) -> int:
    settings = settings_from_args(argv)
    configure_logging(settings.log_level)
    log.info("berth serve (pid %d)", os.getpid())
    return Runtime(settings).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
