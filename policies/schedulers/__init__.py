"""Token schedulers: how the trace's tokens are grouped into batch steps."""
