"""``sim.channels.SerialChannel`` as flat arrays: one copy worker, a fixed time per copy, a priority queue.

The queue is a binary heap of (priority, sequence number, key) rows with lazily dropped stale rows, like the
Python ``heapq`` list: a cancelled copy's row stays until popped, an upgraded copy gets a second row, and a
popped row counts only if it is the key's live one (``QPRIO``/``QSEQ``). The clock follows SimPy's arithmetic
exactly as ``SerialChannel`` does: a run until ``to`` stops at ``now + (to - now)``, a copy landing exactly
then waits for the next run, and an idle worker looks at the queue at the next run after a submit.

The landing of a copy is split in two (:func:`land_begin`, :func:`land_end`) so that a driver can run its
``on_complete`` in between, as ``SerialChannel._land_current`` does; the loops over landings for the cache's
``on_complete`` (the copy's key stops being in flight) are here, the perfect-foresight schedules have their
own in :mod:`kernels.oracle`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import cache as kc
from ._jit import helper

QPRIO, QSEQ, PENDING = range(3)  # kq: priority of a queued key (-1: not queued), sequence number of its live
# heap row, queued or being copied (0/1)
HLEN, SEQ, NQUEUED, CUR, CUR_PRIO, WAKE, COPIES = range(7)  # ci
NOW, END, START, SECONDS = range(4)  # cf


class Channel(NamedTuple):
    heap: np.ndarray  # int64 [rows, 3]: (priority, sequence number, key)
    kq: np.ndarray  # int64 [3, N]: per-key fields (above)
    ci: np.ndarray  # int64: HLEN, SEQ, NQUEUED, CUR (key being copied or -1), CUR_PRIO, WAKE, COPIES (started)
    cf: np.ndarray  # float64: NOW, END (when the current copy lands), START (when it started), SECONDS per copy


def new_channel(num_keys: int, rows: int, copy_s: float) -> Channel:
    """An idle channel for keys below ``num_keys``, room for ``rows`` heap rows (every submit and upgrade
    pushes one), each copy taking ``copy_s`` (``CopyModel.seconds(expert_bytes)``)."""
    ci = np.zeros(7, dtype=np.int64)
    ci[CUR] = -1
    ci[WAKE] = 1  # SimPy: the worker process starts at time 0 and looks at the queue
    kq = np.zeros((3, num_keys), np.int64)
    kq[QPRIO] = -1
    return Channel(np.zeros((max(rows, 1), 3), np.int64), kq, ci, np.array([0.0, 0.0, 0.0, float(copy_s)]))


@helper
def _less(h, i, j):
    return h[i, 0] < h[j, 0] or (h[i, 0] == h[j, 0] and h[i, 1] < h[j, 1])


@helper
def _swap(h, i, j):
    for f in range(3):
        h[i, f], h[j, f] = h[j, f], h[i, f]


@helper
def _push(ch, prio, seq, key):
    h = ch.heap
    i = ch.ci[HLEN]
    if i >= len(h):
        raise RuntimeError("copy channel: heap full (kernels sized it too small)")
    h[i, 0] = prio
    h[i, 1] = seq
    h[i, 2] = key
    ch.ci[HLEN] = i + 1
    while i > 0:
        parent = (i - 1) >> 1
        if not _less(h, i, parent):
            break
        _swap(h, i, parent)
        i = parent


@helper
def _pop(ch):
    """Removes the smallest row; returns its (priority, sequence number, key)."""
    h = ch.heap
    prio, seq, key = h[0, 0], h[0, 1], h[0, 2]
    n = ch.ci[HLEN] - 1
    ch.ci[HLEN] = n
    if n > 0:
        for f in range(3):
            h[0, f] = h[n, f]
        i = 0
        while True:
            small = i
            left = 2 * i + 1
            if left < n and _less(h, left, small):
                small = left
            if left + 1 < n and _less(h, left + 1, small):
                small = left + 1
            if small == i:
                break
            _swap(h, i, small)
            i = small
    return prio, seq, key


@helper
def submit(ch, key, prio):
    ch.ci[SEQ] += 1
    _push(ch, prio, ch.ci[SEQ], key)
    if ch.kq[QPRIO, key] < 0:
        ch.ci[NQUEUED] += 1
    ch.kq[QPRIO, key] = prio
    ch.kq[QSEQ, key] = ch.ci[SEQ]
    ch.kq[PENDING, key] = 1
    if ch.ci[CUR] < 0:
        ch.ci[WAKE] = 1


@helper
def cancel(ch, key):
    """Drops a queued copy; False if it is not queued (it started, or never was)."""
    if ch.kq[QPRIO, key] < 0:
        return False
    ch.kq[QPRIO, key] = -1
    ch.ci[NQUEUED] -= 1
    ch.kq[PENDING, key] = 0
    return True


@helper
def upgrade(ch, key):
    """A queued copy moves to demand priority 0."""
    if ch.kq[QPRIO, key] > 0:
        ch.ci[SEQ] += 1
        ch.kq[QPRIO, key] = 0
        ch.kq[QSEQ, key] = ch.ci[SEQ]
        _push(ch, 0, ch.ci[SEQ], key)
        if ch.ci[CUR] < 0:
            ch.ci[WAKE] = 1


@helper
def busy(ch):
    return ch.ci[NQUEUED] > 0 or ch.ci[CUR] >= 0


@helper
def serve(ch, t):
    """The worker takes the best live queued copy at time ``t``, or stays idle."""
    ch.ci[WAKE] = 0
    while ch.ci[HLEN] > 0:
        prio, seq, key = _pop(ch)
        if ch.kq[QPRIO, key] == prio and ch.kq[QSEQ, key] == seq:
            ch.kq[QPRIO, key] = -1
            ch.ci[NQUEUED] -= 1
            ch.ci[CUR] = key
            ch.ci[CUR_PRIO] = prio
            ch.ci[COPIES] += 1
            ch.cf[START] = t
            ch.cf[END] = t + ch.cf[SECONDS]
            return


@helper
def land_begin(ch):
    """The current copy lands: the clock moves to its end; returns its key (run ``on_complete`` next)."""
    key = ch.ci[CUR]
    ch.ci[CUR] = -1
    ch.cf[NOW] = ch.cf[END]
    return key


@helper
def land_end(ch, key):
    """After ``on_complete(key)``: the worker takes the next copy at the landing time, or goes idle."""
    ch.kq[PENDING, key] = 0
    if ch.ci[HLEN] > 0:
        serve(ch, ch.cf[END])
    else:
        ch.ci[WAKE] = 0


# ------------------------------------------------------------------ the loops, for the cache's on_complete
@helper
def _land(ch, c):
    key = land_begin(ch)
    kc.complete(c, key)
    land_end(ch, key)


@helper
def advance(ch, c, to):
    """Simulate the copies up to ``to`` (nothing if the clock is there already)."""
    now = ch.cf[NOW]
    if not to > now:
        return
    at = now + (to - now)  # SimPy schedules its stop event at now + delay
    if ch.ci[WAKE] != 0:
        serve(ch, now)
    while ch.ci[CUR] >= 0 and ch.cf[END] < at:
        _land(ch, c)
    ch.cf[NOW] = at


@helper
def wait_key(ch, c, key):
    if ch.ci[WAKE] != 0:
        serve(ch, ch.cf[NOW])
    while ch.kq[PENDING, key]:
        if ch.ci[CUR] < 0:
            raise RuntimeError("copy channel: no copy in flight while waiting for an expert")
        _land(ch, c)


@helper
def wait_until_landed(ch, c, key, t):
    """``advance(t)`` then ``wait_key(key)``; returns when ``key`` is usable (``t`` or its landing)."""
    if t > ch.cf[NOW]:
        advance(ch, c, t)
    wait_key(ch, c, key)
    return ch.cf[NOW] if ch.cf[NOW] > t else t


@helper
def wait_any(ch, c):
    if ch.ci[WAKE] != 0:
        serve(ch, ch.cf[NOW])
    if ch.ci[CUR] < 0:
        raise RuntimeError("copy channel: no copy in flight to wait for")
    _land(ch, c)
