"""`cnnlab serve` under load: N concurrent clients on localhost for a bounded time, per engine and batching.

    PYTHONPATH=src python benchmarks/serve_load.py RUN [--clients 1,8,32] [--seconds 15] [--engines torch,onnx,int8]
    PYTHONPATH=src python benchmarks/serve_load.py RUN --soak 600 --clients 8 --engines onnx

RUN is a run folder; `onnx` serves its model.onnx and `int8` its model.int8.onnx (`cnnlab export RUN [--int8]`
first). Each client posts one test image (PNG) at a time, waiting for each answer before the next, for `--seconds`
per cell (at most 900; 256 clients at most): it stops by itself. Printed per cell: requests answered, answers/s,
answers/s per core, p50/p95/p99 latency, errors (status >= 500 or none) and 503s, and the server's peak RSS.
`--soak S` runs one cell for S seconds and prints the server's RSS after the first minute and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from cnnlab.evaluate import test_split_for
from cnnlab.models import load_model

MAX_SECONDS, MAX_CLIENTS = 900, 256
MODEL_FILES = {"torch": None, "onnx": "model.onnx", "int8": "model.int8.onnx"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_pngs(run: Path, count: int = 256) -> list[bytes]:
    images = np.asarray(test_split_for(load_model(run), None).images[:count])
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def rss_kb(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of a process, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Server:
    def __init__(self, run: Path, engine: str, max_batch: int):
        model = run / MODEL_FILES[engine] if MODEL_FILES[engine] else run
        self.url = f"http://127.0.0.1:{free_port()}"
        command = [
            sys.executable,
            "-m",
            "cnnlab",
            "serve",
            str(model),
            "--port",
            self.url.rsplit(":", 1)[1],
            "--max-batch",
            str(max_batch),
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.process.kill()
        raise RuntimeError(f"cnnlab serve {model} did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def multipart_request(host: str, body: bytes) -> bytes:
    """A whole POST /predict request (HTTP/1.1, keep-alive) uploading `body` as one PNG file."""
    boundary = "cnnlab-load-boundary"
    form = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + body
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(form)}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()
    return head + form


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bool]:
    """Send one request and read its whole answer: (status, whether the server keeps the connection)."""
    writer.write(request)
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower().split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
    await reader.readexactly(int(headers.get("content-length", "0")))
    return int(head[0].split()[1]), headers.get("connection") != "close"


async def load(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict[str, float]:
    """`clients` connections, each sending its next request when the last is answered, until `seconds` pass.

    A raw HTTP/1.1 client on asyncio streams, each request built once: the load generator shares the server's
    cores, so it spends as little of them as it can."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    requests = [multipart_request(f"{host}:{port}", body) for body in bodies]
    latencies: list[float] = []
    statuses: list[int] = []
    deadline = time.perf_counter() + seconds

    async def client(index: int) -> None:
        sent, connection = index, None
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                connection = connection or await asyncio.open_connection(host, int(port))
                status, keep = await asyncio.wait_for(exchange(*connection, requests[sent % len(requests)]), 30)
                statuses.append(status)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
                statuses.append(0)  # no answer: counted as an error
                keep = False
            latencies.append(time.perf_counter() - started)
            if not keep and connection is not None:
                connection[1].close()
                connection = None
            sent += clients
        if connection is not None:
            connection[1].close()

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    answered = sum(status == 200 for status in statuses)
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    return {
        "requests": len(statuses),
        "answered": answered,
        "per_s": answered / elapsed,
        "per_s_per_core": answered / elapsed / len(os.sched_getaffinity(0)),
        "p50_ms": cuts[49] * 1000,
        "p95_ms": cuts[94] * 1000,
        "p99_ms": cuts[98] * 1000,
        "errors": sum((status >= 500 and status != 503) or status == 0 for status in statuses),
        "busy_503": sum(status == 503 for status in statuses),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--engines", default="torch,onnx,int8")
    parser.add_argument("--batching", default="on,off")
    parser.add_argument("--soak", type=float, default=0.0, help="one long cell of this many seconds")
    arguments = parser.parse_args()
    clients = [min(int(c), MAX_CLIENTS) for c in arguments.clients.split(",")]
    bodies = test_pngs(arguments.run)
    rows = []
    for engine in arguments.engines.split(","):
        for batching in arguments.batching.split(","):
            server = Server(arguments.run, engine, 64 if batching == "on" else 1)
            try:
                if arguments.soak:
                    rows.append(soak(server, bodies, clients[0], min(arguments.soak, MAX_SECONDS)))
                    continue
                for count in clients:
                    cell = asyncio.run(load(server.url, bodies, count, min(arguments.seconds, MAX_SECONDS)))
                    rows.append({"engine": engine, "batching": batching, "clients": count, **cell})
                    print(json.dumps(rows[-1]), flush=True)
                peak = rss_kb(server.process.pid, "VmHWM") / 1024
                for row in rows:
                    if row["engine"] == engine and row["batching"] == batching:
                        row["server_peak_rss_mb"] = peak
            finally:
                server.stop()
    print(json.dumps(rows, indent=1))


def soak(server: Server, bodies: list[bytes], clients: int, seconds: float) -> dict[str, float]:
    first = asyncio.run(load(server.url, bodies, clients, 60.0))
    after_minute = rss_kb(server.process.pid, "VmRSS") / 1024
    rest = asyncio.run(load(server.url, bodies, clients, seconds - 60.0))
    at_end = rss_kb(server.process.pid, "VmRSS") / 1024
    row = {
        "clients": clients,
        "seconds": seconds,
        "rss_after_first_minute_mb": after_minute,
        "rss_at_end_mb": at_end,
        "growth": at_end / after_minute - 1,
        "first_minute": first,
        "rest": rest,
    }
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
