"""Heap trimming: only after intervals with fetch activity, never while idle, and it stops."""

from __future__ import annotations

import trio
import trio.testing

from fusefs.allocator import release_free_memory, release_while_busy


def test_release_free_memory_runs_on_glibc() -> None:
    assert release_free_memory()  # this machine's libc is glibc: False would mean no trimming


def test_trims_follow_activity_and_stop_with_the_session() -> None:
    fetched = [0]
    trims: list[float] = []

    def release() -> bool:
        trims.append(trio.current_time())
        return True

    async def main() -> None:
        stopped = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(release_while_busy, lambda: fetched[0], stopped, 0.25, release)
            await trio.sleep(1.0)  # idle: nothing to give back
            assert trims == []
            fetched[0] += 3
            await trio.sleep(0.3)
            assert len(trims) == 1
            await trio.sleep(1.0)  # no new chunks since
            assert len(trims) == 1
            for _ in range(4):  # busy over several intervals: one trim each
                fetched[0] += 1
                await trio.sleep(0.25)
            assert len(trims) == 5
            stopped.set()
        # the nursery closed: the loop returned once the session stopped

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
