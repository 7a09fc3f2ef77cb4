"""What ``analysis validate`` keeps in its ``--out`` directory so that a run never pools rounds measured with
other settings and an interrupted run resumes.

``manifest.json`` (written atomically before any round runs) holds the settings that decide what a round
measures: the trace (its path and SHA-256, or the synthetic trace's token count), the scale, the policies in
their order, the backend and the extra hydra overrides, plus the number of rounds asked for. A directory
whose manifest holds other settings, or which holds rounds without a manifest (an older version's), is
refused: its rounds are not comparable with this run's. ``--repeats`` is not one of these settings: the rounds
are numbered, round r of N repeats is round r of any other count, so asking for more rounds on the same
``--out`` adds rounds and asking for fewer reads the first ones only.

A round is finished when its ``done.json`` exists (written atomically after its last run). An unfinished
round is run again whole: its profile must be measured next to its own real runs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from traces.io import atomic_path, settings_diff

from .errors import AnalysisError

MANIFEST = "manifest.json"
SCHEMA = "expertflow.validate-manifest/1"
DONE = "done.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def settings(trace: Path | None, tokens: int, scale: int, policies: list[str], backend: str,
             overrides: list[str]) -> dict:
    """The settings a round's results depend on, as JSON values (so a stored copy compares equal)."""
    src = ({"trace": str(trace), "trace_sha256": file_sha256(trace)} if trace
           else {"trace": None, "synthetic_tokens": int(tokens)})
    return {**src, "scale": int(scale), "policies": list(policies), "backend": backend, "overrides": list(overrides)}


def open_out(out: Path, want: dict, repeats: int) -> None:
    """Check that ``out`` is fresh or holds rounds of the settings ``want``, then (re)write its manifest."""
    man = out / MANIFEST
    fix = "use a fresh --out or delete that directory"
    if man.exists():
        try:
            doc = json.loads(man.read_text())
            stored = doc["settings"]
            if doc.get("schema") != SCHEMA or not isinstance(stored, dict):
                raise ValueError(f"expected schema {SCHEMA} with a settings object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AnalysisError(f"{man}: not a validate manifest ({exc}); {fix}") from exc
        if stored != want:
            raise AnalysisError(f"{man}: {out} holds rounds run with other settings ({'; '.join(settings_diff(stored, want))}); {fix}")
    elif any(out.glob("round-*")) or (out / "executor").is_dir() or (out / "sim").is_dir():
        raise AnalysisError(f"{out}: holds validate results without a {MANIFEST} (an older version's), so their "
                            f"settings are unknown; {fix}")
    with atomic_path(man) as tmp:
        tmp.write_text(json.dumps({"schema": SCHEMA, "settings": want, "repeats": int(repeats)}, indent=2) + "\n")


def round_dir(out: Path, r: int) -> Path:
    return out / f"round-{r}"


def round_done(rd: Path) -> bool:
    return (rd / DONE).exists()


def start_round(rd: Path) -> None:
    """Clear what an interrupted attempt at this round left, so none of it is mixed with the new one."""
    if rd.exists():
        shutil.rmtree(rd)


def finish_round(rd: Path, info: dict) -> None:
    with atomic_path(rd / DONE) as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")


def manifest_rounds(out: Path) -> list[Path] | None:
    """The round directories of the run recorded in ``out``'s manifest (None without a manifest)."""
    man = out / MANIFEST
    if not man.exists():
        return None
    try:
        repeats = int(json.loads(man.read_text())["repeats"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AnalysisError(f"{man}: not a validate manifest ({exc})") from exc
    return [round_dir(out, r) for r in range(repeats)]
