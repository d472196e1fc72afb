"""The ingress's admission bounds (deploy/server.py Admission): max_running at once, max_waiting
queued behind them, the rest turned away with an OverloadedError carrying Retry-After; a slot
comes back however its request ends."""

import asyncio

import pytest

from core.errors import OverloadedError
from deploy.server import Admission


def test_past_running_and_waiting_requests_are_turned_away_with_retry_after():
    async def scenario():
        admission = Admission(max_running=2, max_waiting=3, retry_after=7)
        release = asyncio.Event()
        outcomes: list[str] = []

        async def request(i: int):
            try:
                async with admission.slot():
                    await release.wait()
                outcomes.append("answered")
            except OverloadedError as exc:
                outcomes.append(f"turned away, retry after {exc.retry_after}")

        tasks = [asyncio.create_task(request(i)) for i in range(8)]
        while admission.running + admission.waiting < 5 or len(outcomes) < 3:
            await asyncio.sleep(0)
        assert (admission.running, admission.waiting) == (2, 3)
        release.set()
        await asyncio.gather(*tasks)
        assert sorted(outcomes) == ["answered"] * 5 + ["turned away, retry after 7"] * 3
        assert (admission.running, admission.waiting) == (0, 0)
        async with admission.slot():  # free again
            assert admission.running == 1

    asyncio.run(asyncio.wait_for(scenario(), timeout=10))


def test_a_failed_or_cancelled_request_gives_its_slot_back():
    async def scenario():
        admission = Admission(max_running=1, max_waiting=0, retry_after=1)
        with pytest.raises(ValueError):
            async with admission.slot():
                raise ValueError("the request failed")
        held = asyncio.Event()

        async def stalled():
            async with admission.slot():
                held.set()
                await asyncio.sleep(3600)

        task = asyncio.create_task(stalled())
        await held.wait()
        with pytest.raises(OverloadedError):  # one running, none may wait
            async with admission.slot():
                pass
        task.cancel()  # a client that went away
        with pytest.raises(asyncio.CancelledError):
            await task
        async with admission.slot():
            assert admission.running == 1

    asyncio.run(asyncio.wait_for(scenario(), timeout=10))
