"""`within`: a time limit that never drops the caller's cancel (the Python 3.11 wait_for race)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from internvl.serve.timeouts import within


def test_a_cancel_that_arrives_with_the_result_still_cancels():
    async def main():
        loop = asyncio.get_running_loop()
        inner = loop.create_future()
        waiter = asyncio.ensure_future(within(inner, 10.0))
        await asyncio.sleep(0)  # the waiter is now suspended on `inner`

        def both_at_once():  # the result and the cancel land in the same loop turn
            inner.set_result("late")
            waiter.cancel()

        loop.call_soon(both_at_once)
        with pytest.raises(asyncio.CancelledError):
            await waiter

    if sys.version_info < (3, 11):
        pytest.skip("3.10 has only asyncio.wait_for, which has this race")  # the package still runs there
    asyncio.run(main())


def test_the_limit_raises_timeout_error_and_a_result_in_time_is_returned():
    async def main():
        with pytest.raises(TimeoutError):
            await within(asyncio.sleep(5), 0.05)
        assert await within(asyncio.sleep(0, result=7), 1.0) == 7

    asyncio.run(main())
