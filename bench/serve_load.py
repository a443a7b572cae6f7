"""Load test of `tunewise serve`: N concurrent clients on loopback, batched serving against one request at a time.

Starts `tunewise serve` as a subprocess (the example's config, bundled model, production = the registry's
production model or the base), then for each mode (dynamic batching with serve.max_batch=64, and
max_batch=1) runs `--clients` concurrent clients, each sending chat completions of BANKING77 test messages
back to back, until `--requests` have been sent or `--seconds` have passed. Prints throughput, latency
p50/p95/p99, status counts (no 5xx expected), the server's peak RSS, and the batched/unbatched ratio.

    python bench/serve_load.py [--clients 100] [--requests 400] [--seconds 90] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run_mode(url: str, texts: list[str], clients: int, requests: int, seconds: float, max_tokens: int, model: str) -> dict:
    import httpx2 as httpx

    lat, statuses, sent = [], {}, 0
    stop_at = time.monotonic() + seconds
    lock = asyncio.Lock()

    async def client(i: int, http: httpx.AsyncClient):
        nonlocal sent
        while True:
            async with lock:
                if sent >= requests or time.monotonic() > stop_at:
                    return
                k = sent
                sent += 1
            body = {"model": model, "messages": [{"role": "user", "content": texts[k % len(texts)]}], "max_tokens": max_tokens, "temperature": 0}
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/v1/chat/completions", json=body)
                code = r.status_code
            except httpx.HTTPError as e:
                code = type(e).__name__
            statuses[code] = statuses.get(code, 0) + 1
            if code == 200:
                lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    async with httpx.AsyncClient(timeout=httpx.Timeout(seconds + 600), limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    wall = time.perf_counter() - t0
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")  # noqa: E731
    return {"ok": len(lat), "wall_s": wall, "rps": len(lat) / wall, "p50": q(0.5), "p95": q(0.95), "p99": q(0.99), "statuses": statuses}


def start_server(config: Path, port: int, max_batch: int, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tunewise.cli", "serve", str(config), "--port", str(port), "--set", f"serve.max_batch={max_batch}",
           "--set", "serve.request_timeout_s=1200", "--set", "serve.queue_size=1000"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    import httpx2 as httpx

    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return p
        except httpx.HTTPError:
            time.sleep(0.5)
    p.kill()
    raise RuntimeError("server did not start")


def stop_server(p: subprocess.Popen, timeout: float = 20) -> None:
    p.send_signal(signal.SIGINT)
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "examples" / "support-intents" / "tunewise.yaml")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--model", default="production")
    ap.add_argument("--modes", default="batched,one-at-a-time")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    with open(ROOT / "examples" / "support-intents" / "data" / "test.csv", newline="") as f:
        texts = [r["text"] for r in csv.DictReader(f)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNEWISE_API_KEYS": ""}
    rows = {}
    for mode in args.modes.split(","):
        port = free_port()
        proc = start_server(args.config, port, 64 if mode == "batched" else 1, env)
        try:
            rows[mode] = asyncio.run(run_mode(f"http://127.0.0.1:{port}", texts, args.clients, args.requests, args.seconds, args.max_tokens, args.model))
            rows[mode]["peak_mb"] = peak_rss_mb(proc.pid)
        finally:
            stop_server(proc)
    t = Table(title=f"tunewise serve: {args.clients} concurrent clients, loopback, model {args.model}, max_tokens {args.max_tokens}")
    for h in ("mode", "ok requests", "wall s", "req/s", "p50 s", "p95 s", "p99 s", "statuses", "5xx", "server peak MB"):
        t.add_column(h)
    for mode, r in rows.items():
        fivexx = sum(v for k, v in r["statuses"].items() if isinstance(k, int) and k >= 500)
        t.add_row(mode, str(r["ok"]), f"{r['wall_s']:.1f}", f"{r['rps']:.2f}", f"{r['p50']:.2f}", f"{r['p95']:.2f}", f"{r['p99']:.2f}",
                  str(r["statuses"]), str(fivexx), f"{r['peak_mb']:.0f}")
    Console(width=200).print(t)
    if len(rows) == 2:
        a, b = rows["batched"], rows["one-at-a-time"]
        Console(width=200).print(f"batched / one-at-a-time throughput: {a['rps'] / b['rps']:.1f}x")


if __name__ == "__main__":
    main()
