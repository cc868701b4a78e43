"""Continuous batching through the HTTP server: aggregate completion tokens/s of 16 concurrent streaming clients vs
one client, against `internvl serve` (uvicorn, a separate process) on 127.0.0.1.

    python benchmarks/serve_throughput.py                      # the shipped demo model (~1 min)
    python benchmarks/serve_throughput.py --model random-0.5b  # + a random model with InternVL3-1B's LLM shapes

Each client sends streaming chat requests one after another (`ignore_eos`, so every request generates exactly
`--max-tokens` tokens, and `include_usage`, whose counts are summed); a client's next request starts when its
previous stream ended. Aggregate throughput = completion tokens of all clients / wall time of the phase. Target:
16 clients >= 6x one client. Prints a markdown table (machine, command and load average included); nothing is
written to disk except the random model's checkpoint, in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine_info  # noqa: E402

TARGET_RATIO = 6.0
PROMPT = "Describe a picture with three shapes of different colors."


# ---------------------------------------------------------------------------------------------- models
def random_model_dir(root: Path) -> Path:
    """The demo model's config and tokenizer with InternVL3-1B's LLM shapes (Qwen2.5-0.5B: 896 wide, 24 layers,
    14 heads / 2 KV heads, MLP 4864) and random weights (`common.init_random_`). Its vocabulary stays the demo's
    716 tokens, so the lm_head is small: decode cost is the transformer's."""
    from dataclasses import replace

    import torch
    from common import init_random_

    from internvl import InternVLChatModel
    from internvl.demo.model import DEMO_MODEL_DIR

    demo = InternVLChatModel.from_pretrained(DEMO_MODEL_DIR)
    llm = replace(demo.config.llm, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                  num_kv_heads=2, head_dim=64)
    model = init_random_(InternVLChatModel(replace(demo.config, llm=llm))).to(torch.bfloat16)  # as the demo's file
    out = root / "random-0.5b"
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEMO_MODEL_DIR / name, out / name)
    return out


# ---------------------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path: Path | None, port: int, max_batch_size: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "internvl.cli", "serve"] + ([str(model_path)] if model_path else [])
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--max-batch-size", str(max_batch_size),
            "--model-name", "bench", "--log-level", "warning"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not become ready in 300 s")


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)  # graceful: nothing is in flight any more
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


# ---------------------------------------------------------------------------------------------- load
async def one_stream(client: httpx.AsyncClient, max_tokens: int) -> int:
    body = {"model": "bench", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0.8, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    usage = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"error event: {event}")
                usage = event.get("usage") or usage
    return usage["completion_tokens"]


async def phase(base: str, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    """`clients` concurrent clients, each sending `requests_per_client` streams one after another."""
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def run_client() -> int:
            return sum([await one_stream(client, max_tokens) for _ in range(requests_per_client)])

        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(run_client() for _ in range(clients))))
        seconds = time.perf_counter() - t0
    return {"clients": clients, "requests": clients * requests_per_client, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds}


def measure(name: str, model_path: Path | None, args) -> dict:
    port = free_port()
    server = start_server(model_path, port, max_batch_size=args.clients)
    base = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(phase(base, 2, 1, 4))  # warm-up: first forward passes, allocator, connections
        one = asyncio.run(phase(base, 1, args.single_requests, args.max_tokens))
        many = asyncio.run(phase(base, args.clients, args.requests_per_client, args.max_tokens))
    finally:
        stop_server(server)
    return {"model": name, "one": one, "many": many, "ratio": many["tokens_per_s"] / one["tokens_per_s"]}


# ---------------------------------------------------------------------------------------------- report
def table(rows: list[dict], clients: int) -> str:
    lines = [f"| model | 1 client, tokens/s | {clients} clients, tokens/s | ratio | target | met |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        one, many = r["one"], r["many"]
        lines.append(f"| {r['model']} | {one['tokens_per_s']:.1f} ({one['tokens']} tokens in {one['seconds']:.1f} s) "
                     f"| {many['tokens_per_s']:.1f} ({many['tokens']} tokens in {many['seconds']:.1f} s) "
                     f"| {r['ratio']:.2f}x | >= {TARGET_RATIO:g}x | {'yes' if r['ratio'] >= TARGET_RATIO else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", choices=["demo", "random-0.5b"], default=None,
                   help="model(s) to serve (repeatable; default: demo)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients of the second phase (default 16)")
    p.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request (default 64)")
    p.add_argument("--single-requests", type=int, default=6, help="requests of the one-client phase (default 6)")
    p.add_argument("--requests-per-client", type=int, default=3,
                   help="requests per client in the concurrent phase (default 3)")
    args = p.parse_args(argv)
    models = args.model or ["demo"]

    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_start = load_average()
    rows = []
    with tempfile.TemporaryDirectory(prefix="internvl-serve-bench-") as tmp:
        for name in models:
            path = None if name == "demo" else random_model_dir(Path(tmp))
            rows.append(measure(name, path, args))
            print(f"{name}: {rows[-1]['ratio']:.2f}x", file=sys.stderr, flush=True)
    info = machine_info(threads=os.cpu_count() or 1)
    print(f"Run: `python benchmarks/serve_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
          f"on {started}; load average at start {load_start}, at end {load_average()}.")
    print(f"Machine: {info['cpu']}, {info['cores']} cores ({', '.join(info['isa'])}), torch {info['torch']}, "
          f"Python {info['python']}; server and clients on this machine (server: `internvl serve`, "
          f"--max-batch-size {args.clients}; clients: httpx, asyncio).")
    print(f"Requests: streamed chat, {len(PROMPT.split())}-word text prompt, temperature 0.8, ignore_eos, "
          f"max_tokens {args.max_tokens}; 1 client x {args.single_requests} requests, then {args.clients} clients x "
          f"{args.requests_per_client} requests.\n")
    print(table(rows, args.clients))
    return 0 if all(r["ratio"] >= TARGET_RATIO for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
