"""Pluggable policies: eviction (cache), predictor, horizon and scheduler, one small module each."""
