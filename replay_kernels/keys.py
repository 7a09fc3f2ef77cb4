"""The replay's access stream as flat arrays: per layer-step, its distinct expert keys and their use counts.

Layout (shared by every kernel; "CSR", compressed rows): layer-step ``i = step * L + layer`` owns
``keys[ptr[i]:ptr[i + 1]]``, its distinct keys in first-seen order (token by token in the step's order, each
token's experts in trace order), and ``counts`` over the same range, how many of the step's tokens use each.
This is what ``sim.run.step_keys`` builds as a list of arrays and a list of dicts, without a Python object
per layer-step. The future (which layer-steps use each key, for Belady and the bounds) is the same data
grouped by key: ``at[fptr[key]:fptr[key + 1]]`` ascending (:func:`future_index`). The kernels' states hold
both packed in one array (:func:`pack_stream`).
"""

from __future__ import annotations

import numpy as np

from ._jit import inline, jit


@jit
def _keys_kernel(experts, offsets, step_ptr, step_tokens, num_keys):
    T, L, K = experts.shape
    S = len(step_ptr) - 1
    ptr = np.zeros(S * L + 1, dtype=np.int64)
    keys = np.empty(len(step_tokens) * L * K, dtype=np.int64)
    counts = np.empty(len(step_tokens) * L * K, dtype=np.int64)
    mark = np.full(num_keys, -1, dtype=np.int64)  # layer-step that last saw the key
    pos = np.zeros(num_keys, dtype=np.int64)  # its position in keys then
    n = 0
    for s in range(S):
        for layer in range(L):
            i = s * L + layer
            off = offsets[layer]
            for j in range(step_ptr[s], step_ptr[s + 1]):
                tok = step_tokens[j]
                for r in range(K):
                    key = np.int64(experts[tok, layer, r]) + off
                    if mark[key] != i:
                        mark[key] = i
                        pos[key] = n
                        keys[n] = key
                        counts[n] = 1
                        n += 1
                    else:
                        counts[pos[key]] += 1
            ptr[i + 1] = n
    return ptr, keys[:n].copy(), counts[:n].copy()


def layer_step_keys(experts: np.ndarray, offsets: np.ndarray, step_ptr: np.ndarray, step_tokens: np.ndarray,
                    num_keys: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ptr, keys, counts) of the module docstring for ``experts`` int [T, L, K] replayed in steps: step ``s``
    computes the trace tokens ``step_tokens[step_ptr[s]:step_ptr[s + 1]]``. ``offsets[layer]`` turns an expert
    into its key; ``num_keys`` bounds the keys."""
    return _keys_kernel(np.ascontiguousarray(experts), np.asarray(offsets, dtype=np.int64),
                        np.asarray(step_ptr, dtype=np.int64), np.asarray(step_tokens, dtype=np.int64), int(num_keys))


def steps_csr(steps) -> tuple[np.ndarray, np.ndarray]:
    """``(step_ptr, step_tokens)`` of a list of scheduler steps (``policies.base.Step``)."""
    sizes = np.fromiter((len(s.tokens) for s in steps), dtype=np.int64, count=len(steps))
    ptr = np.zeros(len(steps) + 1, dtype=np.int64)
    np.cumsum(sizes, out=ptr[1:])
    tokens = np.concatenate([np.asarray(s.tokens, dtype=np.int64) for s in steps]) if steps else np.zeros(0, np.int64)
    return ptr, tokens


def future_index(ptr: np.ndarray, keys: np.ndarray, num_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """(fptr, at): the layer-steps using each key, ascending (a stable sort of the stream by key)."""
    steps = np.repeat(np.arange(len(ptr) - 1, dtype=np.int64), np.diff(ptr))
    order = np.argsort(keys, kind="stable")
    fptr = np.zeros(num_keys + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=num_keys), out=fptr[1:])
    return fptr, steps[order]


def pack_stream(ptr: np.ndarray, keys: np.ndarray, num_keys: int | None = None) -> np.ndarray:
    """The stream as the kernels' states hold it, one int64 array: a header (layer-steps, keys, where the future
    starts), ``ptr``, ``keys``, then, given ``num_keys``, the future: ``s[o + key]:s[o + key + 1]`` is the range
    of ``s`` holding ``key``'s layer-steps, ascending (``o = s[2]``; without a future ``s[2] == len(s)``)."""
    ptr = np.asarray(ptr, np.int64)
    keys = np.asarray(keys, np.int64)
    head = 3 + len(ptr) + len(keys)
    extra = 0 if num_keys is None else num_keys + 1 + len(keys)
    s = np.empty(head + extra, np.int64)
    s[:3] = len(ptr) - 1, len(keys), head
    s[3:3 + len(ptr)] = ptr
    s[3 + len(ptr):head] = keys
    if num_keys is not None:
        _future_kernel(ptr, keys, int(num_keys), s[head:], head)
    return s


@jit
def _future_kernel(ptr, keys, num_keys, out, base):
    """A counting sort of the stream by key (stable: each key's layer-steps ascending) into ``out``: offsets
    (absolute, ``base`` being where ``out`` starts in the packed stream), then the layer-steps."""
    first = num_keys + 1
    for j in range(num_keys + 1):
        out[j] = 0
    for j in range(len(keys)):
        out[keys[j] + 1] += 1
    for k in range(num_keys):
        out[k + 1] += out[k]
    fill = out[:num_keys].copy()
    for i in range(len(ptr) - 1):
        for j in range(ptr[i], ptr[i + 1]):
            k = keys[j]
            out[first + fill[k]] = i
            fill[k] += 1
    for k in range(num_keys + 1):
        out[k] += base + first


def stream_rows(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ptr, keys) of a packed stream (views)."""
    n = int(s[0])
    return s[3:3 + n + 1], s[3 + n + 1:3 + n + 1 + int(s[1])]


@inline
def next_use(s, base, key, now, horizon, cursor):
    """First layer-step >= ``now`` that uses ``key`` (``horizon`` if none): ``FutureIndex.next_use``, over the
    future at ``s[base:]`` (:func:`pack_stream`). ``cursor[key]`` keeps where the key's last answer was found
    (0: never asked): the replays ask at a clock that only moves forward, so an answer is a step or two past the
    last one instead of a binary search through the whole future (a cache miss per level); a query that went
    back in time searches."""
    lo = s[base + key]
    end = s[base + key + 1]
    i = cursor[key]
    if i < lo or (i > lo and s[i - 1] >= now):
        hi = end
        while lo < hi:
            mid = (lo + hi) >> 1
            if s[mid] < now:
                lo = mid + 1
            else:
                hi = mid
        i = lo
    else:
        while i < end and s[i] < now:
            i += 1
    cursor[key] = i
    return s[i] if i < end else horizon
