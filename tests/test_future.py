"""FutureIndex and FarthestNextUse: a key's recorded next use is always the first use strictly after its last
touch, whether touches move forward (the cursor) or back (the search)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.future import FarthestNextUse, FutureIndex


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), backwards=st.booleans())
def test_next_use_after_every_touch(seed, backwards):
    rng = np.random.default_rng(seed)
    needed = [np.unique(rng.integers(0, 6, rng.integers(1, 4))) for _ in range(40)]
    fut = FutureIndex(needed)
    order = FarthestNextUse(fut)
    touches = sorted(rng.integers(0, 45, 30).tolist())
    if backwards:  # out of order: every touch must still find the right next use
        rng.shuffle(touches)
    for now in touches:
        key = int(rng.integers(0, 7))  # key 6 is never used: its next use is the horizon
        order.touch(key, now)
        want = next((t for t in range(now + 1, len(needed)) if key in needed[t].tolist()), len(needed))
        assert order.next_of(key) == want == fut.next_use(key, now + 1)
