"""Routing traces: one format, importers, a synthetic generator, statistics and a collector."""

from .io import atomic_path, read_trace, write_trace
from .schema import PHASE_DECODE, PHASE_PREFILL, SCHEMA_VERSION, Trace, TraceError, TraceMeta
from .split import split_by_sequence

__all__ = [
    "PHASE_DECODE",
    "PHASE_PREFILL",
    "SCHEMA_VERSION",
    "Trace",
    "TraceError",
    "TraceMeta",
    "atomic_path",
    "read_trace",
    "split_by_sequence",
    "write_trace",
]
