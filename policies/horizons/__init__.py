"""Prediction horizons (one module each): how many layers ahead the driver prefetches.

Every horizon exposes ``min_distance`` and ``max_distance``; ``distance()`` always lies between them.
"""
