"""Eviction policies (one module each): which resident expert an :class:`~policies.cache.ExpertCache` drops.

Every policy breaks ties deterministically (by recency of the hook calls, then by key) so that a seed gives
identical results; ``tests/test_policies_reference.py`` checks each one hit for hit against a plain reference.
"""

from ..base import EvictionPolicy


class TouchOnUse(EvictionPolicy):
    """Hooks shared by policies whose state only changes when a key is used: a hit and an insert are both a
    touch (``self._touch(key, now)``, which each such policy defines) and a removal keeps the key's history."""

    def on_hit(self, key: int, now: int) -> None:
        self._touch(key, now)

    def on_insert(self, key: int, now: int) -> None:
        self._touch(key, now)

    def on_remove(self, key: int) -> None:
        pass  # history survives eviction: that is what makes these policies frequency-aware

    def _touch(self, key: int, now: int) -> None:
        raise NotImplementedError
