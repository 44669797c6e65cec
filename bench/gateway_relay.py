#!/usr/bin/env python3
"""How many SSE chunks per CPU-second the gateway relays, from a synthetic upstream.

    PYTHONPATH=operator python bench/gateway_relay.py --chunks 200000 --streams 4

The upstream is a bare asyncio server that writes pre-built chat-completion chunks (with
``"usage":null`` on each, as Berth's server does when the gateway injects include_usage, so the
gateway's strip path runs). The gateway runs in its own process; its CPU time (utime + stime from
/proc) divides the chunks it relayed. The client counts the chunks it received.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CHUNK = b'data: {"id":"x","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,"delta":{"content":"tok"},"finish_reason":null}],"usage":null}\n\n'

GATEWAY = """
import sys, uvicorn
from berth.gateway.main import build
from berth.gateway.registry import Endpoint, Instance, Key, hash_key
from berth.gateway.settings import GatewaySettings
app, gw = build(GatewaySettings(kubernetes=False))
gw.registry.put_instance(Instance("bench", "m", "m"))
gw.registry.put_slice("bench", "m", "s", (Endpoint("127.0.0.1", int(sys.argv[1])),))
gw.registry.put_key(Key("bench", "k", "ak-bench", hash_key("bench-key")))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def upstream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, chunks: int, batch: int
) -> None:
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)  # read the body: closing with unread bytes would reset the connection
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    body = CHUNK * batch
    framed = f"{len(body):x}\r\n".encode() + body + b"\r\n"
    for _ in range(chunks // batch):
        writer.write(framed)
        await writer.drain()
    done = b"data: [DONE]\n\n"
    writer.write(f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n")
    await writer.drain()
    writer.close()


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    per_stream = args.chunks // args.streams
    server = await asyncio.start_server(lambda r, w: upstream(r, w, per_stream, args.batch), "127.0.0.1", 0)
    up_port = server.sockets[0].getsockname()[1]
    gw_port = up_port + 1 if up_port < 65000 else up_port - 1
    env = {**os.environ, "PYTHONPATH": str(ROOT / "operator")}
    proc = subprocess.Popen([sys.executable, "-c", GATEWAY, str(up_port), str(gw_port)], env=env)
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            for _ in range(200):
                try:
                    await client.get(f"http://127.0.0.1:{gw_port}/health/live")
                    break
                except httpx.HTTPError:
                    await asyncio.sleep(0.1)

            async def one() -> int:
                n = 0
                body = {"model": "m", "stream": True, "messages": []}
                async with client.stream(
                    "POST",
                    f"http://127.0.0.1:{gw_port}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": "Bearer bench-key"},
                ) as r:
                    async for data in r.aiter_raw():
                        n += data.count(b"\n\n")
                return n

            cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
            counts = await asyncio.gather(*(one() for _ in range(args.streams)))
            wall, cpu = time.perf_counter() - t0, cpu_seconds(proc.pid) - cpu0
    finally:
        proc.terminate()
        proc.wait(10)
        server.close()
    relayed = sum(counts)
    return {
        "benchmark": "gateway SSE relay, synthetic upstream",
        "streams": args.streams,
        "chunks_per_upstream_write": args.batch,
        "chunks_relayed": relayed,
        "wall_seconds": round(wall, 3),
        "gateway_cpu_seconds": round(cpu, 3),
        "chunks_per_cpu_second": round(relayed / cpu) if cpu else None,
        "chunks_per_wall_second": round(relayed / wall),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared), {platform.python_implementation()} {platform.python_version()}",
        "note": "client, upstream and gateway share the machine; usage:null stripped from every chunk",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=200_000)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--batch", type=int, default=1, help="chunks per upstream write (1: one per token)")
    p.add_argument("-o", "--output")
    args = p.parse_args()
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
