"""EventStream (serve/asgi.py) driven by hand-made ASGI `receive`/`send`, without a server: how each way a stream can
end reaches `on_close(disconnected)`, which decides whether the request is counted as a client disconnect."""

import asyncio

import pytest

from internvl.serve.asgi import EventStream

SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "method": "POST", "path": "/"}


async def events(n: int | None):
    """`n` SSE events, or an endless stream (None)."""
    k = 0
    while n is None or k < n:
        yield f"data: {k}\n\n".encode()
        k += 1
        await asyncio.sleep(0)


def serve(body, receive, send) -> tuple[list[bool], Exception | None]:
    """Run one EventStream over `body`; return what on_close was told (once per call) and what escaped, if anything."""
    closes: list[bool] = []

    async def on_close(disconnected: bool) -> None:
        closes.append(disconnected)

    try:
        asyncio.run(asyncio.wait_for(EventStream(body, on_close, {})(SCOPE, receive, send), 10))
    except Exception as e:  # noqa: BLE001 - the tests assert on what escaped
        return closes, e
    return closes, None


async def never_disconnects():
    await asyncio.Event().wait()


def test_complete_stream_closes_as_not_disconnected():
    sent = []

    async def send(message):
        sent.append(message)

    assert serve(events(3), never_disconnects, send) == ([False], None)
    assert [m.get("body") for m in sent[1:]] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n", b""]
    assert sent[-1]["more_body"] is False


def test_http_disconnect_message_stops_the_stream_and_counts_as_disconnect():
    sent, gone = [], asyncio.Event()

    async def receive():
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if len(sent) == 4:
            gone.set()

    assert serve(events(None), receive, send) == ([True], None)
    assert len(sent) < 10  # the endless body was cancelled within a few events, not drained


@pytest.mark.parametrize("error", [ConnectionResetError, BrokenPipeError, OSError])
def test_a_send_that_fails_counts_as_disconnect_and_does_not_escape(error):
    """A transport that breaks while sending (the server never got http.disconnect) is the client leaving: before the
    fix the OSError left the task group as an ExceptionGroup, the request was not counted as a disconnect and the
    exception reached the server's error log."""
    calls = 0

    async def send(message):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise error("peer went away")

    assert serve(events(None), never_disconnects, send) == ([True], None)
    assert calls == 3


def test_an_error_in_the_body_is_not_a_disconnect():
    async def failing():
        yield b"data: 0\n\n"
        raise RuntimeError("bug in the body")

    async def send(message):
        pass

    closes, escaped = serve(failing(), never_disconnects, send)
    assert "bug in the body" in repr(escaped)  # anyio re-raises it, inside an ExceptionGroup
    assert closes == [False]
