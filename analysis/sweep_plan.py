"""What a hydra sweep planned against what finished, so a report on a sweep that was killed midway says how many
runs are missing instead of presenting the finished ones as the whole grid.

A sweep folder holds ``multirun.yaml`` (hydra writes it before launching any job): the sweeper's ``params`` and
the command line's overrides. Expanded as hydra's basic sweeper expands them (the same parser and the same
cartesian product), they are the planned jobs, each a list of ``key=value`` overrides; every job folder records
its own list in ``.hydra/overrides.yaml``. A planned job with no folder holding both that list and a
``results.json`` is missing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SweepStatus:
    sweep_dir: Path  # the folder holding multirun.yaml
    planned: int | None  # jobs the sweep planned (None: could not be counted, see ``problem``)
    finished: int  # of them, jobs with a results.json
    started: list[str] = field(default_factory=list)  # missing jobs that have a folder (killed or failed)
    never_started: list[str] = field(default_factory=list)  # missing jobs without a folder
    problem: str | None = None  # why the planned jobs could not be counted

    @property
    def missing(self) -> int:
        return len(self.started) + len(self.never_started)

    def sentence(self) -> str:
        """One plain sentence for the report (empty for a complete sweep)."""
        if self.problem:
            return f"{self.sweep_dir}: the planned jobs could not be counted ({self.problem})."
        if not self.missing:
            return ""
        examples = (self.started + self.never_started)[:5]
        more = f" and {self.missing - len(examples)} more" if self.missing > len(examples) else ""
        return (f"{self.sweep_dir}: {self.missing} of {self.planned} planned runs are missing "
                f"({len(self.started)} started but wrote no results: killed or failed; {len(self.never_started)} never "
                f"started), so the tables and figures compare the {self.finished} finished runs only. Missing: "
                + "; ".join(examples) + more + ".")


def planned_jobs(multirun_yaml: Path) -> list[list[str]]:
    """The jobs of a sweep, in hydra's order (job number = index), each as its list of overrides. Raises
    ValueError when the sweep's sweeper is not hydra's basic one or its overrides cannot be expanded."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(multirun_yaml)
    sweeper = cfg.hydra.sweeper
    target = str(sweeper.get("_target_", ""))
    if not target.endswith("BasicSweeper"):
        raise ValueError(f"sweeper {target or '(none)'} is not hydra's basic sweeper")
    params = OmegaConf.to_container(sweeper.get("params") or {}, resolve=False)
    args = [f"{k}={v}" for k, v in params.items()] + [str(o) for o in cfg.hydra.overrides.task]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
        return [list(job) for job in BasicSweeper.split_arguments(overrides, None)[0]]
    except Exception as exc:  # hydra's parser and sweeper raise their own exception types
        raise ValueError(f"cannot expand the overrides {args}: {exc}") from exc


def job_overrides(run_dir: Path) -> frozenset[str] | None:
    """The overrides a job folder records, or None if it records none."""
    import yaml

    p = run_dir / ".hydra" / "overrides.yaml"
    try:
        got = yaml.safe_load(p.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return frozenset(map(str, got)) if isinstance(got, list) else None


def sweep_status(root: Path, finished_dirs: set[Path]) -> list[SweepStatus]:
    """Per sweep under ``root`` (every multirun.yaml outside a ``report`` folder): planned, finished and missing
    jobs. ``finished_dirs``: the folders whose results.json the report uses."""
    out = []
    for mr in sorted(Path(root).rglob("multirun.yaml")):
        if "report" in mr.relative_to(root).parts:
            continue
        sweep = mr.parent
        try:
            planned = planned_jobs(mr)
        except (OSError, ValueError) as exc:
            out.append(SweepStatus(sweep, None, 0, problem=str(exc)))
            continue
        done: set[frozenset[str]] = set()
        started: set[frozenset[str]] = set()
        for ov_file in sweep.rglob(".hydra/overrides.yaml"):
            run = ov_file.parent.parent
            ov = job_overrides(run)
            if ov is not None:
                (done if run in finished_dirs else started).add(ov)
        st = SweepStatus(sweep, len(planned), 0)
        for num, job in enumerate(planned):
            key = frozenset(job)
            label = f"#{num} " + " ".join(job)
            if key in done:
                st.finished += 1
            elif key in started:
                st.started.append(label)
            else:
                st.never_started.append(label)
        out.append(st)
    return out
