"""A bounded load test on loopback (SERVING.md §12, §13 #44 in small): 64 concurrent streaming requests against a
real uvicorn on 127.0.0.1 serving the shipped demo model (16 running sequences, the rest queued), of which 6 clients
disconnect mid-stream and 6 send bad input.

Shows: no 5xx; each bad input gets its 400 envelope before any stream starts; every good request ends with a
finish_reason and `[DONE]`, and greedy ones give the same text as when sent alone; the disconnected requests are
aborted within a few engine steps (metrics: aborts, generated tokens); afterwards the running / waiting / in-flight
gauges and KV usage are back at their baseline (0), read from /metrics and the engine, no request-scoped object is
left alive, and the process RSS is back near its baseline (tolerance below).

Bounds: 64 requests, max_tokens <= 24 for good ones, a 120 s wall-clock cap on the whole run; nothing but
127.0.0.1 is contacted.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import gc
import json
import re
import time
import warnings
from pathlib import Path

import httpx
import pytest
import torch

from serve.app_fixtures import (
    MODEL,
    assert_error,
    chat_body,
    engine_idle,
    image_content,
    keeps_serving,
    live_server,
    png_data_url,
)

CONCURRENCY = 64
DISCONNECTS = 6  # ~10 %
# Tokens a disconnected request may generate in all: it leaves after 2 and is aborted when the server's event loop
# notices the closed socket. Observed, summed over the 6: 18-135 (4-22 each; the loop shares the 2 cores and the GIL
# with the engine and the 64 in-process clients, so its lag varies by 5x between runs). Before the fix in
# serve/generation.py (a yield per streamed event) the loop saw the disconnect only after 15-400 more tokens, sometimes
# not before the stream's end (400 each): the bound sits between the two.
TOKENS_PER_DISCONNECT = 64
BAD = 6  # ~10 %
WALL_CLOCK_CAP_S = 120
# Memory after the run, against a baseline taken after an identical warm-up round (caches already grown):
# * live objects, exactly: the garbage collector's census of the project's types and of torch tensors must not grow
#   (the total of all tracked objects moves with transient asyncio timers, so it is not compared);
# * RSS, roughly: read after glibc's malloc_trim, it still moved by up to 68 MiB between identical rounds here
#   (allocator fragmentation from tensors of varying batch shapes, with 2 busy cores), so the tolerance only bounds
#   leaks outside Python objects (native buffers) to about 2 MiB per request.
RSS_TOLERANCE_MIB = 128


def rss_mib() -> float | None:
    """Resident set of this process (server and clients) in MiB after malloc_trim, None where /proc is missing."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS includes the allocator's free lists
        pass
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def live_objects() -> collections.Counter:
    """Objects tracked by the garbage collector: per type for the project's types and torch tensors, and in all."""
    gc.collect()
    census = collections.Counter()
    with warnings.catch_warnings():  # isinstance on some module objects warns of deprecated torch aliases
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        tensors = [isinstance(obj, torch.Tensor) for obj in objects]
    for obj, is_tensor in zip(objects, tensors):
        module = type(obj).__dict__.get("__module__")
        if is_tensor or (isinstance(module, str) and module.startswith("internvl")):
            census[f"{type(obj).__module__}.{type(obj).__qualname__}"] += 1
        census["(all)"] += 1
    return census


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def server_errors(text: str) -> float:
    return sum(float(v) for v in re.findall(r'^internvl_requests_total\{status="5\d\d"\} (\S+)$', text, re.M))


# ---------------------------------------------------------------------------------------------- the request mix
def good_body(i: int) -> dict:
    """Streams of 8..24 tokens reporting usage; every third one greedy; every second one with an image."""
    content = image_content("What color is the shape?", png_data_url(color=("red", "blue", "green")[i % 3])) \
        if i % 2 else f"What is {i % 7} + {i % 5}?"
    return chat_body(content, max_tokens=8 + i % 17, stream=True, temperature=0 if i % 3 == 0 else 0.8,
                     stream_options={"include_usage": True})


BAD_INPUTS = [  # (body or raw bytes, expected param or None); all 400 invalid_request_error-type envelopes
    (chat_body(max_tokens=0, stream=True), "max_tokens"),
    (chat_body(stream=True, temperature=5), "temperature"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}], "stream": True}, "messages[0].role"),
    (chat_body(image_content(url="data:image/png;base64,!!!!"), stream=True), "messages[0].content[0].image_url.url"),
    (chat_body(image_content(url="file:///etc/passwd"), stream=True), "messages[0].content[0].image_url.url"),
    (b'{"model": "internvl-demo", "messages": [', None),
]


async def run_good(client: httpx.AsyncClient, i: int, body: dict) -> dict:
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, (i, r.status_code, await r.aread())
        events = [line[len("data: "):] async for line in r.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", (i, events[-3:])
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), (i, chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1]), (i, finishes)
    tokens = chunks[-1]["usage"]["completion_tokens"]
    assert chunks[-1]["choices"] == [] and 1 <= tokens <= body["max_tokens"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    return {"i": i, "text": text, "tokens": tokens}


async def run_disconnect(client: httpx.AsyncClient, i: int) -> dict:
    body = chat_body(f"Tell me a long story number {i}.", max_tokens=400, stream=True, ignore_eos=True)
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, (i, r.status_code)
        seen = 0
        async for line in r.aiter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:  # the role chunk and two tokens: then the client goes away mid-stream
                break
    return {"i": i, "disconnected_after": seen}


async def run_bad(client: httpx.AsyncClient, i: int, body, param) -> dict:
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = await client.post("/v1/chat/completions", **kwargs)
    assert_error(r, 400, param=param if param is not None else "<any>")
    return {"i": i, "status": r.status_code}


ROLES = ["good"] * CONCURRENCY  # bad inputs and disconnects spread over the run
for _k in range(BAD):
    ROLES[5 + 10 * _k] = "bad"
for _k in range(DISCONNECTS):
    ROLES[2 + 10 * _k] = "disconnect"


async def load_round(base: str) -> list[dict]:
    """64 requests at once."""
    limits = httpx.Limits(max_connections=CONCURRENCY + 8, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(90.0), limits=limits) as client:
        bad = iter(BAD_INPUTS)
        jobs = []
        for i, role in enumerate(ROLES):
            if role == "good":
                jobs.append(run_good(client, i, good_body(i)))
            elif role == "bad":
                jobs.append(run_bad(client, i, *next(bad)))
            else:
                jobs.append(run_disconnect(client, i))
        return await asyncio.wait_for(asyncio.gather(*jobs), WALL_CLOCK_CAP_S)


# ---------------------------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def live():
    with live_server() as s:
        yield s


def settled(base: str, engine, timeout: float = 10.0) -> str:
    """/metrics once the gauges are at their idle values (0) and the engine holds nothing."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(base + "/metrics").text
        idle = all(metric(text, g) == 0 for g in ("internvl_requests_running", "internvl_requests_waiting",
                                                  "internvl_requests_in_flight", "internvl_kv_cache_usage_ratio"))
        if idle and engine_idle(engine, timeout=0.1):
            return text
        assert time.monotonic() < deadline, f"not back to baseline after {timeout} s:\n{text}"
        time.sleep(0.05)


def test_64_concurrent_streams_with_disconnects_and_bad_inputs(live):
    base, engine = live.base, live.engine
    greedy_alone = {}
    for i, role in enumerate(ROLES):  # the greedy good requests' answers when sent alone
        if role == "good" and good_body(i)["temperature"] == 0:
            greedy_alone[i] = asyncio.run(_alone(base, i))

    asyncio.run(load_round(base))  # warm-up: allocator caches grow to their working size
    before = settled(base, engine)
    objects_before, rss_before = live_objects(), rss_mib()
    assert metric(before, "internvl_kv_cache_usage_ratio") == 0

    t0 = time.monotonic()
    results = asyncio.run(load_round(base))
    elapsed = time.monotonic() - t0
    after = settled(base, engine)
    objects_after, rss_after = live_objects(), rss_mib()

    assert len(results) == CONCURRENCY and elapsed < WALL_CLOCK_CAP_S
    good = [r for r in results if "text" in r]
    assert len(good) == CONCURRENCY - BAD - DISCONNECTS
    assert sum("disconnected_after" in r for r in results) == DISCONNECTS
    assert sum(r.get("status") == 400 for r in results) == BAD
    for r in good:  # continuous batching does not change greedy answers
        if r["i"] in greedy_alone:
            assert r["text"] == greedy_alone[r["i"]], r["i"]

    assert server_errors(after) == 0
    assert metric(after, "internvl_aborts_total", '{reason="client_disconnect"}') - \
        metric(before, "internvl_aborts_total", '{reason="client_disconnect"}') == DISCONNECTS
    generated = metric(after, "internvl_generation_tokens_total") - metric(before, "internvl_generation_tokens_total")
    after_disconnect = generated - sum(r["tokens"] for r in good)
    assert 2 * DISCONNECTS <= after_disconnect <= TOKENS_PER_DISCONNECT * DISCONNECTS, after_disconnect
    assert metric(after, "internvl_requests_total", '{status="400"}') - \
        metric(before, "internvl_requests_total", '{status="400"}') == BAD
    assert metric(after, "internvl_kv_cache_usage_ratio") == metric(before, "internvl_kv_cache_usage_ratio") == 0
    assert engine.pool.allocator.num_used == 0 and not live.state.inflight
    grown = {t: objects_after[t] - objects_before[t] for t in objects_after if objects_after[t] > objects_before[t]}
    assert set(grown) <= {"(all)"}, grown  # the total moves with transient asyncio timers; types are exact
    if rss_before is not None:
        assert rss_after - rss_before < RSS_TOLERANCE_MIB, (rss_before, rss_after)
    with httpx.Client(base_url=base, timeout=30) as client:
        keeps_serving(client, image=True)


async def _alone(base: str, i: int) -> str:
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        return (await run_good(client, i, good_body(i)))["text"]
