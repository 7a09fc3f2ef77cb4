"""``sim.channels.SerialChannel`` as flat arrays: one copy worker, a fixed time per copy, a priority queue.

The queue is a binary heap of (priority, sequence number, key) rows with lazily dropped stale rows, like the
Python ``heapq`` list: a cancelled copy's row stays until popped, an upgraded copy gets a second row, and a
popped row counts only if it is the key's live one (QPRIO/QSEQ). The clock follows SimPy's arithmetic
exactly as ``SerialChannel`` does: a run until ``to`` stops at ``now + (to - now)``, a copy landing exactly
then waits for the next run, and an idle worker looks at the queue at the next run after a submit.

The landing of a copy is split in two (:func:`land_begin`, :func:`land_end`) so that a driver can run its
``on_complete`` in between, as ``SerialChannel._land_current`` does; the loops over landings for the cache's
``on_complete`` (the copy's key stops being in flight) are here, the perfect-foresight schedules have their
own in :mod:`replay_kernels.oracle`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import cache as kc
from ._jit import helper, inline

# q rows. By key: QPRIO (priority of a queued key, -1 if not queued), QSEQ (sequence number of its live heap
# row), PENDING (queued or being copied, 0/1); by heap row: H_PRIO, H_SEQ, H_KEY; CI: integer scalars
QPRIO, QSEQ, PENDING, H_PRIO, H_SEQ, H_KEY, CI = range(7)
HLEN, SEQ, NQUEUED, CUR, CUR_PRIO, WAKE, COPIES = range(7)  # CI: heap rows, sequence counter, keys queued, key
# being copied (-1: idle), its priority, whether the idle worker looks at the queue at the next run, copies started
NOW, END, START, SECONDS = range(4)  # cf: clock, when the current copy lands, when it started, seconds per copy


class Channel(NamedTuple):
    q: np.ndarray  # int64 [7, width]: the rows above
    cf: np.ndarray  # float64 [4]


def new_channel(num_keys: int, rows: int, copy_s: float) -> Channel:
    """An idle channel for keys below ``num_keys``, room for ``rows`` heap rows (every submit and upgrade
    pushes one), each copy taking ``copy_s`` (``CopyModel.seconds(expert_bytes)``)."""
    q = np.zeros((7, max(num_keys, rows, 7)), np.int64)
    q[QPRIO] = -1
    q[CI, CUR] = -1
    q[CI, WAKE] = 1  # SimPy: the worker process starts at time 0 and looks at the queue
    return Channel(q, np.array([0.0, 0.0, 0.0, float(copy_s)]))


@inline
def _less(q, i, j):
    return q[H_PRIO, i] < q[H_PRIO, j] or (q[H_PRIO, i] == q[H_PRIO, j] and q[H_SEQ, i] < q[H_SEQ, j])


@inline
def _swap(q, i, j):
    for r in range(H_PRIO, H_KEY + 1):
        q[r, i], q[r, j] = q[r, j], q[r, i]


@helper
def _push(q, prio, seq, key):
    i = q[CI, HLEN]
    if i >= q.shape[1]:
        raise RuntimeError("copy channel: heap full (kernels sized it too small)")
    q[H_PRIO, i] = prio
    q[H_SEQ, i] = seq
    q[H_KEY, i] = key
    q[CI, HLEN] = i + 1
    while i > 0:
        parent = (i - 1) >> 1
        if not _less(q, i, parent):
            break
        _swap(q, i, parent)
        i = parent


@helper
def _pop(q):
    """Removes the smallest row; returns its (priority, sequence number, key)."""
    prio, seq, key = q[H_PRIO, 0], q[H_SEQ, 0], q[H_KEY, 0]
    n = q[CI, HLEN] - 1
    q[CI, HLEN] = n
    if n > 0:
        for r in range(H_PRIO, H_KEY + 1):
            q[r, 0] = q[r, n]
        i = 0
        while True:
            small = i
            left = 2 * i + 1
            if left < n and _less(q, left, small):
                small = left
            if left + 1 < n and _less(q, left + 1, small):
                small = left + 1
            if small == i:
                break
            _swap(q, i, small)
            i = small
    return prio, seq, key


@helper
def submit(ch, key, prio):
    q = ch.q
    q[CI, SEQ] += 1
    _push(q, prio, q[CI, SEQ], key)
    if q[QPRIO, key] < 0:
        q[CI, NQUEUED] += 1
    q[QPRIO, key] = prio
    q[QSEQ, key] = q[CI, SEQ]
    q[PENDING, key] = 1
    if q[CI, CUR] < 0:
        q[CI, WAKE] = 1


@helper
def cancel(ch, key):
    """Drops a queued copy; False if it is not queued (it started, or never was)."""
    q = ch.q
    if q[QPRIO, key] < 0:
        return False
    q[QPRIO, key] = -1
    q[CI, NQUEUED] -= 1
    q[PENDING, key] = 0
    return True


@helper
def upgrade(ch, key):
    """A queued copy moves to demand priority 0."""
    q = ch.q
    if q[QPRIO, key] > 0:
        q[CI, SEQ] += 1
        q[QPRIO, key] = 0
        q[QSEQ, key] = q[CI, SEQ]
        _push(q, 0, q[CI, SEQ], key)
        if q[CI, CUR] < 0:
            q[CI, WAKE] = 1


@inline
def busy(ch):
    return ch.q[CI, NQUEUED] > 0 or ch.q[CI, CUR] >= 0


@inline
def pending(ch, key):
    return ch.q[PENDING, key] != 0


@inline
def now(ch):
    return ch.cf[NOW]


@helper
def serve(ch, t):
    """The worker takes the best live queued copy at time ``t``, or stays idle."""
    q = ch.q
    q[CI, WAKE] = 0
    while q[CI, HLEN] > 0:
        prio, seq, key = _pop(q)
        if q[QPRIO, key] == prio and q[QSEQ, key] == seq:
            q[QPRIO, key] = -1
            q[CI, NQUEUED] -= 1
            q[CI, CUR] = key
            q[CI, CUR_PRIO] = prio
            q[CI, COPIES] += 1
            ch.cf[START] = t
            ch.cf[END] = t + ch.cf[SECONDS]
            return


@inline
def land_begin(ch):
    """The current copy lands: the clock moves to its end; returns its key (run ``on_complete`` next)."""
    key = ch.q[CI, CUR]
    ch.q[CI, CUR] = -1
    ch.cf[NOW] = ch.cf[END]
    return key


@helper
def land_end(ch, key):
    """After ``on_complete(key)``: the worker takes the next copy at the landing time, or goes idle."""
    ch.q[PENDING, key] = 0
    if ch.q[CI, HLEN] > 0:
        serve(ch, ch.cf[END])
    else:
        ch.q[CI, WAKE] = 0


# ------------------------------------------------------------------ the loops, for the cache's on_complete
@inline
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
    if ch.q[CI, WAKE] != 0:
        serve(ch, now)
    while ch.q[CI, CUR] >= 0 and ch.cf[END] < at:
        _land(ch, c)
    ch.cf[NOW] = at


@helper
def wait_key(ch, c, key):
    if ch.q[CI, WAKE] != 0:
        serve(ch, ch.cf[NOW])
    while ch.q[PENDING, key]:
        if ch.q[CI, CUR] < 0:
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
    if ch.q[CI, WAKE] != 0:
        serve(ch, ch.cf[NOW])
    if ch.q[CI, CUR] < 0:
        raise RuntimeError("copy channel: no copy in flight to wait for")
    _land(ch, c)
