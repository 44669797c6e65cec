"""`berth serve`: run the inference server.

Lifecycle: the HTTP server starts at once (``/health/live`` answers while the model loads); the
model is loaded in a worker thread, the engine started, one warm-up generation run, and only then
does ``/health/ready`` turn true. On SIGTERM (or Ctrl-C) the server drains: ``/health/ready``
turns false, new generation requests get 503, in-flight ones finish (up to ``--drain-timeout``
seconds), then the process exits 0. A model that cannot be loaded exits 1 with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from types import FrameType
from typing import Any

from pydantic import ValidationError

from berth.server.auth import KeyStore
from berth.server.settings import DEFAULT_MODEL, ServerSettings

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="berth serve",
        description="Serve a model over OpenAI- and TGI-compatible HTTP APIs. "
        "Every option can also be set in the environment as BERTH_<OPTION> (e.g. BERTH_PORT).",
    )
    add = p.add_argument
    add("--model", help=f"model reference: {DEFAULT_MODEL}, a HF model directory or a .gguf file")
    add("--served-model-name", help="the name clients send as `model` (default: derived from --model)")
    add(
        "--adapter",
        dest="adapters",
        action="append",
        metavar="NAME=DIR",
        help="a LoRA adapter directory; repeatable (served as <served-model-name>:<NAME>)",
    )
    add("--host", help="address to listen on (default 0.0.0.0)")
    add("--port", type=int, help="port to listen on (default 8000)")
    add(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype (auto: bf16 on CUDA, fp32 on CPU)",
    )
    add("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    add("--max-model-len", type=int, help="context length limit (default: the model's)")
    add("--max-num-seqs", type=int, help="requests in the running batch at most (default 32)")
    add("--max-queue", type=int, help="requests waiting behind them at most; more get 429 (default 256)")
    add("--max-num-batched-tokens", type=int, help="tokens per engine step (default 512)")
    add(
        "--kv-cache-memory-fraction",
        type=float,
        help="CUDA: fraction of free memory for the KV cache (default 0.5)",
    )
    add("--kv-cache-cpu-gib", type=float, help="CPU: KV cache size in GiB (default 1)")
    add(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run decode steps as captured CUDA graphs (default off until measured; see docs/engine.md)",
    )
    add(
        "--api-key-dir",
        help="directory with one API key per file (file name = key id); see also BERTH_API_KEYS",
    )
    add(
        "--log-content",
        action="store_const",
        const=True,
        default=None,
        help="put prompt and completion text into the access log (off by default)",
    )
    add(
        "--drain-timeout",
        "--grace",
        dest="drain_timeout",
        type=float,
        help="seconds in-flight requests may take to finish after SIGTERM (default 30)",
    )
    add("--max-n", type=int, help="largest `n` (choices) one request may ask for (default 8)")
    add("--log-level", help="critical | error | warning | info | debug (default info)")
    add("--no-warmup", dest="warmup", action="store_const", const=False, default=None, help=argparse.SUPPRESS)
    return p


def settings_from_args(argv: list[str]) -> ServerSettings:
    """Command line over environment (BERTH_*) over defaults; exits 2 on invalid values."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "adapters" in given:
        given["adapters"] = tuple(given["adapters"])
    try:
        return ServerSettings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        parser.error(problems)
        raise  # unreachable: parser.error exits


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
        model = load_model(
            s.model,
            served_name=s.served_model_name,
            dtype=s.dtype,
            device=s.device,
            max_model_len=s.max_model_len,
            adapters=s.adapter_map(),
        )
        config = EngineConfig(
            max_num_seqs=s.max_num_seqs,
            max_queue=s.max_queue,
            max_num_batched_tokens=s.max_num_batched_tokens,
            kv_cache_memory_fraction=s.kv_cache_memory_fraction,
            kv_cache_cpu_gib=s.kv_cache_cpu_gib,
            cuda_graphs=s.cuda_graphs,
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
            self.state.metrics.bind_engine(self.engine)
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
            "ready in %.1f s: serving %s (%s on %s, max_model_len %d%s) at http://%s:%d",
            time.monotonic() - started,
            info.served_name,
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
