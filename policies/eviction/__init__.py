"""Eviction policies (one module each): which resident expert an :class:`~policies.cache.ExpertCache` drops.

Every policy breaks ties deterministically (by recency of the hook calls, then by key) so that a seed gives
identical results; ``tests/test_policies_reference.py`` checks each one hit for hit against a plain reference.
"""
