"""Run test work in threads released together (races between sessions)."""

from __future__ import annotations

import threading


def at_once(n: int, work) -> None:
    """Run ``work(i)`` for i in 0..n-1 in n threads released together; fails with their errors."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            work(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
