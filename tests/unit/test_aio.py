"""podsweep.aio: a sleep that wakes on stop, and waiting for the first of events and futures."""

from __future__ import annotations

import asyncio

from podsweep import aio


async def test_sleep_unless_wakes_when_stop_is_set() -> None:
    stop = asyncio.Event()
    sleeping = asyncio.create_task(aio.sleep_unless(stop, 3600))
    await asyncio.sleep(0)  # the sleep is waiting
    stop.set()
    assert await asyncio.wait_for(sleeping, 30) is True


async def test_sleep_unless_says_false_when_the_time_passed() -> None:
    assert await aio.sleep_unless(asyncio.Event(), 0) is False


async def test_sleep_unless_returns_at_once_when_already_stopped() -> None:
    stop = asyncio.Event()
    stop.set()
    assert await aio.sleep_unless(stop, 3600) is True


async def test_wait_first_returns_on_a_done_future_and_leaves_it_and_the_events_alone() -> None:
    stop, changed = asyncio.Event(), asyncio.Event()
    lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    other: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(aio.wait_first((stop, changed, lost, other)))
    await asyncio.sleep(0)
    lost.set_result("gone")
    await asyncio.wait_for(waiting, 30)
    assert not other.cancelled()  # a future it was given is never cancelled
    assert not stop.is_set()
    assert not changed.is_set()


async def test_wait_first_cancels_the_tasks_it_made() -> None:
    stop, changed = asyncio.Event(), asyncio.Event()
    before = asyncio.all_tasks()
    waiting = asyncio.create_task(aio.wait_first((stop, changed)))
    await asyncio.sleep(0)
    made = asyncio.all_tasks() - before - {waiting}
    assert len(made) == 2  # one per event
    changed.set()
    await asyncio.wait_for(waiting, 30)
    await asyncio.sleep(0)  # the cancellations are delivered
    assert all(task.done() for task in made)


async def test_wait_first_returns_on_a_finished_task() -> None:
    stop = asyncio.Event()
    finished = asyncio.create_task(asyncio.sleep(0))
    await asyncio.wait_for(aio.wait_first((stop, finished)), 30)
    assert finished.done()
    assert not stop.is_set()
