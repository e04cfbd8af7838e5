"""Marks with an owner in a huey queue's storage: a key naming the process that holds it
(host, pid, a token) with a heartbeat, renewed while its job runs and taken over, by exactly one
caller, once its holder is gone. The lock of an automatic round and the mark of a running
prediction (:mod:`cellspot.jobs`) are such marks; huey's own ``lock_task`` has no holder and no
expiry (a killed worker kept it for good).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from huey import Huey

log = logging.getLogger(__name__)

#: a mark held by a running job (the lock of an automatic round, a running prediction) is
#: renewed this often ...
MARK_BEAT_S = 30.0
#: ... and taken as left by a dead worker once not renewed for this long
MARK_STALE_S = 180.0
#: tokens of the marks (and takeover claims) this process holds now
_HELD_TOKENS: set[str] = set()


class MarkLostError(RuntimeError):
    """The mark this process held was taken over (:meth:`_HeldMark.check`)."""


class MarkHeldError(RuntimeError):
    """A live holder has the mark at ``key`` (:func:`hold_mark`); ``holder`` is its value."""

    def __init__(self, key: str, holder: Any) -> None:
        self.key, self.holder = key, holder
        super().__init__(f"the mark {key} is held by {describe_holder(holder)}")


def new_holder(**fields: Any) -> dict[str, Any]:
    """A mark naming this process as its holder: ``fields`` plus host, pid, a new token and a
    heartbeat (``beat``, epoch seconds)."""
    return {**fields, "host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
            "beat": time.time()}


def holder_alive(holder: Any) -> bool:
    """Whether the holder of a mark (:func:`new_holder`) still runs: not when it was a process of
    this host that no longer runs, or this very process (restarted with the same pid) not
    holding it now; else while renewed within :data:`MARK_STALE_S`. A mark without a holder
    is dead."""
    try:
        host, pid, beat, token = str(holder["host"]), int(holder["pid"]), float(holder["beat"]), holder["token"]
    except (TypeError, KeyError, ValueError):
        return False
    if host == socket.gethostname():
        if pid == os.getpid():
            return token in _HELD_TOKENS
        if not pid_alive(pid):
            return False
    return time.time() - beat < MARK_STALE_S


def take_mark(huey: Huey, key: str, mine: Any, *, alive: Callable[[Any], bool] = holder_alive) -> Any | None:
    """Put ``mine`` at ``key`` of the queue's storage unless a live mark is there: ``None`` when
    ``key`` now holds ``mine``, else the mark that holds it. A mark that ``alive`` calls dead is
    replaced by :func:`swap_mark`: of several callers that found the same dead mark, exactly one
    takes it over and the others get the winner's mark."""
    found: Any = None
    for _ in range(3):  # a mark released between the put and the read: once more
        if huey.put_if_empty(key, mine):
            return None
        found = huey.get(key, peek=True)
        if found is None:
            continue
        if alive(found):
            return found
        if swap_mark(huey, key, found, mine):
            if isinstance(found, dict) and "host" in found:  # a worker's mark: it stopped renewing
                log.warning("%s: taken over from %s, which no longer renews it", key, describe_holder(found))
            else:  # a mark without a holder (a queued job's): replaced as planned
                log.info("%s: replaced %s", key, describe_holder(found))
            return None
        found = huey.get(key, peek=True)  # the mark of whoever swapped it first
        if found is not None:
            return found
    return found or {}


def swap_mark(huey: Huey, key: str, expected: Any, new: Any | None) -> bool:
    """Compare and swap: put ``new`` at ``key`` (``None``: delete it) if ``key`` still holds
    ``expected``; of several callers swapping the same value, one wins.

    huey's storage has no compare-and-swap, only ``put_if_empty``: the caller first claims
    ``expected`` as the mark ``{key}.takeover.<fingerprint of expected>`` (a mark with a holder,
    so the claim of a caller killed mid-swap is taken over in turn), checks that ``key`` still
    holds ``expected``, writes, and deletes its claim. Every write of a held mark (its
    renewal and release included) goes through here, so a renewal cannot bring back a mark
    someone took over, and a late caller that read ``expected`` before finds the key changed.
    (A caller paused for longer than :data:`MARK_STALE_S` between its claim and its write may
    still write: the limit of any lease.)"""
    claim_key = f"{key}.takeover.{_fingerprint(expected)}"
    claim = new_holder()
    _HELD_TOKENS.add(claim["token"])
    try:
        if take_mark(huey, claim_key, claim) is not None:
            return False
        try:
            if _fingerprint(huey.get(key, peek=True)) != _fingerprint(expected):
                return False  # changed since it was read: someone else swapped it first
            if new is None:
                huey.delete(key)
            else:
                huey.put(key, new)
            return True
        finally:
            huey.delete(claim_key)
    finally:
        _HELD_TOKENS.discard(claim["token"])


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextmanager
def hold_mark(huey: Huey, key: str, fields: dict[str, Any] | None = None, *,
              alive: Callable[[Any], bool] = holder_alive) -> Iterator[_HeldMark]:
    """Hold a mark at ``key`` of the queue's storage while the block runs (it gets the mark, whose
    :meth:`_HeldMark.check` says whether it is still this process's): ``fields`` and its
    holder (:func:`new_holder`), renewed every :data:`MARK_BEAT_S` by a thread and removed at
    the end (unless it was taken over meanwhile). :class:`MarkHeldError` when a mark that
    ``alive`` calls live is there (default :func:`holder_alive`); a dead one is taken over
    (:func:`take_mark`)."""
    mark = _HeldMark(huey, key, new_holder(**(fields or {})))
    _HELD_TOKENS.add(mark.value["token"])
    try:
        found = take_mark(huey, key, mark.value, alive=alive)
        if found is not None:
            raise MarkHeldError(key, found)
        stop = threading.Event()
        beat = threading.Thread(target=mark.beat, args=(stop,), daemon=True, name=f"mark-beat-{key}")
        beat.start()
        try:
            yield mark
        finally:
            stop.set()
            beat.join()
            mark.release()
    finally:
        _HELD_TOKENS.discard(mark.value["token"])


@dataclass
class _HeldMark:
    """What this process last wrote at ``key`` (:func:`hold_mark`)."""

    huey: Huey
    key: str
    value: dict[str, Any]
    lost: threading.Event = field(default_factory=threading.Event)
    _writing: threading.Lock = field(default_factory=threading.Lock)

    def beat(self, stop: threading.Event) -> None:
        """Renew the mark every :data:`MARK_BEAT_S` until ``stop``, or until someone took it over."""
        while not stop.wait(MARK_BEAT_S):
            renewed = {**self.value, "beat": time.time()}
            try:
                with self._writing:  # the key and ``value`` change together (see check)
                    if not swap_mark(self.huey, self.key, self.value, renewed):
                        self.lost.set()
                        log.warning("the mark %s was taken over by another worker; not renewed", self.key)
                        return
                    self.value = renewed
            except Exception as exc:  # noqa: BLE001 - the queue may be back at the next beat
                log.warning("cannot renew the mark %s: %s", self.key, exc)

    def check(self) -> None:
        """:class:`MarkLostError` when the mark is no longer this process's (taken over while it
        was paused longer than :data:`MARK_STALE_S`): its job stops before its next step. Reads
        the key now, not only what the last renewal saw; a queue that does not answer counts as
        still held (the renewal notices later)."""
        holder: Any = None
        if not self.lost.is_set():
            with self._writing:
                try:
                    holder = self.huey.get(self.key, peek=True)
                except Exception as exc:  # noqa: BLE001 - see above
                    log.warning("cannot read the mark %s: %s", self.key, exc)
                    return
                if _fingerprint(holder) == _fingerprint(self.value):
                    return
                self.lost.set()
        by = f" by {describe_holder(holder)}" if isinstance(holder, dict) else ""
        raise MarkLostError(f"the mark {self.key} was taken over{by}")

    def release(self) -> None:
        try:
            swap_mark(self.huey, self.key, self.value, None)
        except Exception as exc:  # noqa: BLE001 - the job's own result matters more; the mark goes stale
            log.warning("cannot remove the mark %s: %s", self.key, exc)


def describe_holder(holder: Any) -> str:
    """Who holds a mark, for messages: "a worker on HOST (pid PID, renewed at TIME)"."""
    if not isinstance(holder, dict):
        return "an unreadable mark"
    if "host" not in holder:
        return f"a job {holder.get('state') or 'marked'} since {holder.get('since')}"
    try:
        beat = datetime.fromtimestamp(float(holder["beat"]), timezone.utc).isoformat(timespec="seconds")
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        beat = "an unknown time"
    return f"a worker on {holder['host']} (pid {holder.get('pid')}, renewed at {beat})"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it exists
        return True
    return True
