"""Where a run's trace comes from: ``trace.path`` (any trace file), or, when it is null, the synthetic
generator with ``trace.synth`` settings (or an importer with ``trace.imported``), cached under
``paths.traces_dir`` (default ``.cache/traces``) keyed by those settings and by the source of ``traces/`` (editing the generator makes a new
trace, not a stale one)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from traces import Trace, TraceError, read_trace, write_trace
from traces.io import safe_name

from .bounds_cache import code_digest


def project_path(path: str) -> Path:
    """``path`` made absolute against the directory the command was started in (hydra's original cwd)."""
    try:
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(path))
    except ValueError:  # hydra not initialised (called from Python)
        return Path(path).resolve()


def resolve_trace(node, cache_dir: str | Path) -> Trace:
    """The trace a ``trace`` config node names (read, or generated or imported once and kept in ``cache_dir``,
    ``paths.traces_dir``: relative to the directory the command started in)."""
    path = node.get("path")
    if path:
        p = project_path(str(path))
        if not p.exists():
            raise TraceError(f"trace.path: no such trace file {p}")
        return read_trace(p)
    from omegaconf import OmegaConf

    spec = node.get("synth") or node.get("imported")
    if not spec:
        raise TraceError(f"trace '{node.get('name')}': set trace.path, trace.synth or trace.imported")
    settings = OmegaConf.to_container(spec, resolve=True) if not isinstance(spec, dict) else dict(spec)
    key = json.dumps(settings, sort_keys=True) + code_digest(("traces",))
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    cache_dir = project_path(str(cache_dir))
    out = cache_dir / f"{safe_name(node.get('name', 'synth'))}-{digest}.parquet"  # a name never leaves cache_dir
    if out.exists():
        return read_trace(out)
    write_trace(synth_from_settings(settings) if node.get("synth") else import_from_settings(settings), out)
    return read_trace(out)


def trace_name(node) -> str:
    """The name a run's results carry: ``trace.name``, except for a ``trace.path`` that replaces a generated or
    imported trace (``python -m sim trace.path=X.parquet`` keeps the default group's name) or that ``trace=file``
    left unnamed (its default name ``file``; ``trace.path=a,b`` sweeps two traces): then the file's stem."""
    path = node.get("path")
    if path and (node.get("synth") or node.get("imported") or node.get("name") == "file"):
        return Path(str(path)).stem
    return str(node.get("name"))


def synth_from_settings(settings: dict) -> Trace:
    """A synthetic trace from ``{"preset": NAME, "tokens": N, "sequences": S, "seed": K, ...knobs}``."""
    from traces.synth import generate, preset_config

    settings = dict(settings)
    preset = settings.pop("preset", None)
    if preset is None:
        raise TraceError(f"trace.synth: field 'preset' is missing; got {sorted(settings)}")
    return generate(preset_config(str(preset), **settings))


def import_from_settings(settings: dict) -> Trace:
    """An imported trace from ``{"sources": [...], "format": FMT, "model_preset": NAME}`` (paths relative to
    the working directory, i.e. the project root)."""
    from traces.importers import import_trace
    from traces.presets import get_preset

    missing = [k for k in ("sources", "format", "model_preset") if k not in settings]
    if missing:
        raise TraceError(f"trace.imported: missing field(s) {missing}")
    sources = [project_path(str(s)) for s in settings["sources"]]
    meta = get_preset(str(settings["model_preset"])).meta(source=f"import:{settings['format']}")
    return import_trace(sources, str(settings["format"]), meta, str(settings.get("align", "strict")))
