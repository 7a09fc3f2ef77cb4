"""Bandwidth and compute models of real hardware.

Copy-time models (slow tier -> fast memory), all in seconds for a copy of ``nbytes``. A config picks one with
two keys (:func:`build_models`): ``hardware.bandwidth.source`` (where the figures come from; ``profile``: the
``profiled`` model) and ``hardware.bandwidth.sharing`` (how concurrent copies share the link: ``independent``,
``shared`` or ``partial``, on the config's figures: ``alpha_beta``, ``shared_link``, ``partial_link``):
- ``constant``: bytes / bandwidth (built in code; ``alpha_beta`` with ``latency_s: 0`` times copies the same).
- ``alpha_beta``: latency + bytes / bandwidth (small per-expert copies fall well below link peak).
- ``shared_link``: alpha_beta per copy, but concurrent copies share the link's bandwidth equally
  (processor sharing, the latency included; see :class:`replay.channels.CopyChannels`).
- ``partial_link``: a partially shared link. Each copy first pays its latency alone (hand-offs, not link
  time), then ``n`` copies on the link move ``bandwidth x s(n)`` bytes/s together, split equally, with
  ``s(1) = 1``, ``s(2) = pair_speedup`` (1: one shared link, 2: independent channels; see
  :meth:`CopyModel.link_speedup` for ``n > 2``).
- ``profiled``: a measured table bytes -> seconds (``executor profile``), interpolated; the fitted
  latency + bandwidth extrapolate beyond the table. The table is one expert's copy as the executor's I/O
  threads get it during a replay (pick-up + read while the main thread computes + the waiter's wake-up), on
  ``io_threads`` independent channels. When the profile measured how the tier serves two copies at once
  (``copy.replay.pair_speedup``, 1 = two reads split one link, 2 = they run as fast as one), a tier that
  does not scale (speedup below ``SHARED_BELOW``) becomes a ``shared_link`` of ``io_threads`` copies, two at
  once splitting its rate (``hardware.bandwidth.sharing``: ``auto`` (default), ``shared``, ``partial`` or
  ``independent`` overrides the choice). ``partial`` is a ``partial_link`` that reproduces both measured cases
  exactly: latency = pick-up + wake-up, bandwidth = ``expert_bytes / read_alone_s``, and the measured
  ``pair_speedup`` (= 2 x ``read_alone_s`` / ``read_pair_s``, so a pair's reads span ``read_pair_s``), clamped
  to [1, 2]. Processor sharing shares the per-copy latency too, so the link has one number, a
  copy's time alone X (two at once: 2X); ``hardware.bandwidth.shared_fit``: ``alone_and_pair`` (default) fits
  X by least squares to both measured cases (alone: pick-up + ``read_alone_s`` + wake-up; a pair: pick-up +
  ``read_pair_s`` + wake-up), ``alone`` takes the first (the pair's hand-offs are then charged twice).
Compute models give the dense (attention etc.) time of a layer for a number of tokens, and the time of one
expert's FFN for the tokens routed to it (``hardware.compute.source``: ``profile`` picks ``profiled``, any other
the roofline on the config's figures):
- ``analytic``: roofline, max(FLOPs / achievable FLOP/s, bytes read / achievable memory bandwidth).
- ``profiled``: measured tables, interpolated (``executor profile``: the dense part and one expert as the
  executor's replay loop pays them, means over an all-resident loop), plus ``layer_overhead_s`` added to every
  layer's dense time: the host's per-layer decision loop (policy runtime, copy submission and the main-thread
  cost of each copy), which the executor pays on its compute thread and which depends on the policy; measure
  it with ``python -m executor profile loop`` and pass ``hardware.compute.layer_overhead_s`` (default: the
  profile's ``compute.layer_overhead_s``, else 0). ``expert_overhead_s`` is added to every expert's time: the
  main thread's cost of the copies in flight (``executor profile`` measures it per copy; ``profile loop``
  spreads it over the experts computed per layer-step). It belongs there, not in the layer's dense time:
  the cost is paid while copies are in flight, i.e. overlapping them, and charged before the layer's copies
  are submitted it would instead delay them and show up as stall.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GB = 1e9
# a measured pair speedup below this is modelled as one shared link (processor sharing), at or above it as
# independent channels: the two models the copy channels have, and 1.5 is halfway between them
SHARED_BELOW = 1.5


class HardwareConfigError(ValueError):
    """A hardware setting is missing or out of range."""


@dataclass
class CopyModel:
    kind: str  # constant | alpha_beta | shared_link | partial_link | profiled (results.json run.copy_model)
    bandwidth_bytes_per_s: float  # link bandwidth of one channel (shared by all copies for shared_link)
    latency_s: float = 0.0  # fixed cost per copy (alpha)
    channels: int = 1  # copies in flight at once
    table_bytes: np.ndarray | None = None  # profiled: sizes measured
    table_s: np.ndarray | None = None  # profiled: seconds measured
    expert_bytes: int | None = None  # profiled: the (scaled) expert size the profile measured; replay copies that
    pair_speedup: float = 1.0  # partial_link: s(2), two copies' total rate over one copy's alone (1 to 2)

    def __post_init__(self):
        # two copies can at most go as fast as two independent ones (2) and, in this model, share at least one
        # copy's rate (1): outside that the profile or the config is wrong, better said here than simulated
        s = self.pair_speedup
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 1.0 <= s <= 2.0:
            raise HardwareConfigError(f"CopyModel.pair_speedup: expected a number in [1, 2], got {s!r}")

    def link_speedup(self, n: int) -> float:
        """s(n) of a partial link: how many single copies' worth of bandwidth ``n`` copies get together. s(1) = 1,
        s(2) = pair_speedup; beyond a pair (never measured: the executor has 2 I/O threads) each further copy
        adds what the second did, capped at n: s(n) = min(n, 1 + (pair_speedup - 1)(n - 1)), linear, so that
        both ends stay exact (1: one fully shared link for every n, 2: independent channels for every n)."""
        return min(float(n), 1.0 + (self.pair_speedup - 1.0) * (n - 1))

    def seconds(self, nbytes: int) -> float:
        """Time of one copy running alone on the link."""
        if self.kind == "constant":
            return nbytes / self.bandwidth_bytes_per_s
        if self.kind == "profiled" and self.table_bytes is not None and nbytes <= self.table_bytes[-1]:
            return float(np.interp(nbytes, self.table_bytes, self.table_s))
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


@dataclass
class ComputeModel:
    kind: str  # analytic | profiled
    hidden_size: int
    intermediate_size: int
    matrices: int = 3  # matrices per expert (3 SwiGLU, 2 plain FFN)
    dtype_bytes: int = 2
    flops_per_s: float = 0.0  # achievable dense FLOP/s (peak x efficiency)
    mem_bytes_per_s: float = 0.0  # achievable fast-memory bandwidth
    dense_tokens: np.ndarray | None = None  # profiled tables
    dense_s: np.ndarray | None = None
    expert_tokens: np.ndarray | None = None
    expert_s: np.ndarray | None = None
    layer_overhead_s: float = 0.0  # profiled: host seconds per layer outside compute (decision loop, submissions)
    expert_overhead_s: float = 0.0  # profiled: main-thread seconds per expert computed (in-flight copies' cost)

    def dense_time_s(self, tokens: int) -> float:
        """Attention + projections of one layer; stand-in of 4 x hidden^2 weights (q, k, v, o). Profiled: plus the
        layer's host overhead ``layer_overhead_s`` (the simulator charges it once per layer, with the dense part)."""
        if self.kind == "profiled":
            return float(np.interp(tokens, self.dense_tokens, self.dense_s)) + self.layer_overhead_s
        weights = 4 * self.hidden_size * self.hidden_size
        return max(2.0 * tokens * weights / self.flops_per_s, weights * self.dtype_bytes / self.mem_bytes_per_s)

    def expert_time_s(self, tokens: int) -> float:
        """One expert's FFN over the ``tokens`` routed to it (reads its weights once)."""
        if self.kind == "profiled":
            return float(np.interp(tokens, self.expert_tokens, self.expert_s)) + self.expert_overhead_s
        weights = self.matrices * self.hidden_size * self.intermediate_size
        return max(2.0 * tokens * weights / self.flops_per_s, weights * self.dtype_bytes / self.mem_bytes_per_s)


def _positive(cfg: dict, key: str, where: str) -> float:
    v = cfg.get(key)
    if v is None or not isinstance(v, (int, float)) or not v > 0:
        raise HardwareConfigError(f"{where}.{key}: expected a positive number, got {v!r}")
    return float(v)


def _fraction(cfg: dict, key: str, default: float, where: str) -> float:
    """An efficiency: the share of a peak rate a device achieves, in (0, 1] (above 1 would beat the peak)."""
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        raise HardwareConfigError(f"{where}.{key}: expected a share of the peak in (0, 1], got {v!r}")
    return float(v)


def _overhead(comp: dict, prof_compute: dict, key: str) -> float:
    """``hardware.compute.<key>`` if set, else the profile's ``compute.<key>``, else 0; never negative."""
    v = comp.get(key)
    v = float(prof_compute.get(key, 0.0) if v is None else v)
    if not v >= 0:
        raise HardwareConfigError(f"hardware.compute.{key}: expected >= 0, got {v}")
    return v


# What the models read from a profile (``python -m executor profile`` writes more).
PROFILE_FIELDS = {
    "copy": ("bandwidth_bytes_per_s", "latency_s", "bytes", "seconds"),
    "compute": ("dense_tokens", "dense_s", "expert_tokens", "expert_s"),
}


def load_profile(path: str | Path, sections: tuple[str, ...] = ("copy", "compute")) -> dict:
    p = Path(path)
    if not p.exists():
        raise HardwareConfigError(f"hardware.profile_path: no such profile file {p} (make one with `python -m executor profile`)")
    try:
        prof = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise HardwareConfigError(f"{p}: not valid JSON ({exc})") from exc
    if not isinstance(prof, dict) or prof.get("schema") != "expertflow.hwprofile/1":
        got = prof.get("schema") if isinstance(prof, dict) else type(prof).__name__
        raise HardwareConfigError(f"{p}: field 'schema': expected 'expertflow.hwprofile/1', got {got!r}")
    for section in sections:  # only what the caller's models read
        fields, part = PROFILE_FIELDS[section], prof.get(section)
        missing = [f for f in fields if not isinstance(part, dict) or f not in part]
        if missing:
            raise HardwareConfigError(f"{p}: section '{section}' lacks field(s) {missing} (profile again with "
                                      "`python -m executor profile`)")
    return prof


def profiled_copy_model(prof: dict, sharing: str, channels: int, path, fit: str = "alone_and_pair") -> CopyModel:
    """The copy model of a profile: independent channels at the measured replay time per copy, or, when the
    tier measured as one shared link (``sharing`` auto and pair speedup < ``SHARED_BELOW``, or ``shared``),
    processor sharing with a copy alone taking pick-up + ``read_alone_s`` + wake-up; ``partial``: the partially
    shared link of :func:`partial_copy_model`."""
    if fit not in ("alone", "alone_and_pair"):
        raise HardwareConfigError(f"hardware.bandwidth.shared_fit: expected alone|alone_and_pair, got {fit!r}")
    if sharing not in ("auto", "shared", "partial", "independent"):
        raise HardwareConfigError(f"hardware.bandwidth.sharing: expected auto|shared|partial|independent, got {sharing!r}")
    c = prof["copy"]
    threads = int(c.get("io_threads", channels))
    expert_bytes = prof.get("expert_bytes")
    rep = c.get("replay") or {}
    speedup = rep.get("pair_speedup")
    if sharing == "partial":
        return partial_copy_model(rep, expert_bytes, threads, path)
    if sharing == "shared" and (speedup is None or not expert_bytes):
        raise HardwareConfigError(f"{path}: hardware.bandwidth.sharing=shared needs copy.replay.pair_speedup and "
                                  "expert_bytes (profile again with `python -m executor profile`)")
    # auto does not pick ``partial``: re-simulating one validate run (3 rounds, noisy machine) with each model,
    # partial had median |time error| 16.9% against the shared link's 9.0% (max 57% vs 76%): it reproduces the
    # profile's alone and pair cases exactly, but in that run the profile's copy alone was slower than the
    # replays' (more stall for on-demand caches), which the least-squares shared fit happens to absorb
    if sharing == "shared" or (sharing == "auto" and speedup is not None and expert_bytes and speedup < SHARED_BELOW):
        alone = float(rep["read_alone_s"])
        if not alone > 0:
            raise HardwareConfigError(f"{path}: copy.replay.read_alone_s: expected a positive number, got {alone!r}")
        # the hand-offs (pick-up, wake-up) are the shared link's per-copy latency; the read drains the bytes
        latency = float(rep.get("pickup_s", 0.0)) + float(rep.get("wake_s", 0.0))
        one = latency + alone  # a copy alone, as measured
        pair = rep.get("read_pair_s")
        if fit == "alone_and_pair" and pair:
            # processor sharing shares the latency too, so the model has one number, a copy's time alone (X), and
            # predicts X alone and 2X for two at once: least squares over both measured cases
            one = (one + 2 * (latency + float(pair))) / 5
        latency = min(latency, one / 2)
        return CopyModel("shared_link", expert_bytes / (one - latency), latency, threads, expert_bytes=expert_bytes)
    return CopyModel("profiled", float(c["bandwidth_bytes_per_s"]), float(c["latency_s"]), threads,
                     np.asarray(c["bytes"], float), np.asarray(c["seconds"], float), expert_bytes)


def partial_copy_model(rep: dict, expert_bytes: int | None, threads: int, path) -> CopyModel:
    """The partial link fitted to the profile's replay loop: it reproduces both measured cases exactly. A copy
    alone: latency (pick-up + wake-up, thread hand-offs that do not hold the disk) + ``read_alone_s`` (so
    bandwidth = expert_bytes / read_alone_s); two at once: both reads span 2 x read_alone_s / s(2) =
    ``read_pair_s`` with s(2) = the measured ``pair_speedup``. A speedup outside [1, 2] is noise around the
    nearest end (a pair cannot beat two independent reads; below 1 the pair case is dominated by the
    machine's other load), so it is clamped there."""
    speedup, alone = rep.get("pair_speedup"), rep.get("read_alone_s")
    if speedup is None or not expert_bytes or not alone:
        raise HardwareConfigError(f"{path}: hardware.bandwidth.sharing=partial needs copy.replay.pair_speedup, "
                                  "read_alone_s and expert_bytes (profile again with `python -m executor profile`)")
    if not float(alone) > 0:
        raise HardwareConfigError(f"{path}: copy.replay.read_alone_s: expected a positive number, got {alone!r}")
    latency = float(rep.get("pickup_s", 0.0)) + float(rep.get("wake_s", 0.0))
    return CopyModel("partial_link", expert_bytes / float(alone), latency, threads, expert_bytes=expert_bytes,
                     pair_speedup=min(2.0, max(1.0, float(speedup))))


# where a hardware node's figures come from: given in the config (one of these; null: not stated), or ``profile``
# (read from ``hardware.profile_path``)
FIGURE_SOURCES = ("datasheet", "measured", "paper", "estimate")
PROFILE = "profile"
# how concurrent copies share a link whose figures the config gives -> the copy model
SHARING_MODELS = {"independent": "alpha_beta", "shared": "shared_link", "partial": "partial_link"}


def _source(node: dict, where: str) -> str | None:
    s = node.get("source")
    if s is not None and s not in (*FIGURE_SOURCES, PROFILE):
        raise HardwareConfigError(f"{where}.source: expected {'|'.join(FIGURE_SOURCES)}|{PROFILE} (or null: not "
                                  f"stated), got {s!r}")
    return s


def build_models(hw: dict, meta) -> tuple[CopyModel, ComputeModel]:
    """Copy and compute models from a ``hardware`` config group (its current keys: see
    :mod:`replay.config_keys` for the old ones) and the trace's metadata. The copy model: the profile's
    (``bandwidth.source: profile``) or, on the config's figures, one per ``bandwidth.sharing``: ``independent``
    -> ``alpha_beta``, ``shared`` -> ``shared_link``, ``partial`` -> ``partial_link``."""
    bw = hw.get("bandwidth", {})
    source = _source(bw, "hardware.bandwidth")
    sharing = str(bw.get("sharing", "auto" if source == PROFILE else "independent"))
    if source != PROFILE and sharing not in SHARING_MODELS:
        raise HardwareConfigError(f"hardware.bandwidth.sharing: expected {'|'.join(SHARING_MODELS)} (auto needs "
                                  f"hardware.bandwidth.source=profile), got {sharing!r}")
    link = bw.get("link")
    if link is not None and not isinstance(link, str):
        raise HardwareConfigError(f"hardware.bandwidth.link: expected a name (e.g. pcie4-x16) or null, got {link!r}")
    channels = int(bw.get("channels", 1))
    if channels < 1:
        raise HardwareConfigError(f"hardware.bandwidth.channels: expected >= 1, got {channels}")
    inter = meta.intermediate_size or max(1, meta.expert_bytes // (3 * 2 * max(meta.hidden_size, 1)))
    comp = hw.get("compute", {})
    csource = _source(comp, "hardware.compute")
    used = tuple(name for name, s in (("copy", source), ("compute", csource)) if s == PROFILE)
    prof = load_profile(hw["profile_path"], used) if used else None
    if source == PROFILE:
        copy = profiled_copy_model(prof, sharing, channels, hw["profile_path"], str(bw.get("shared_fit", "alone_and_pair")))
    else:
        kind = SHARING_MODELS[sharing]
        lat = float(bw.get("latency_s", 0.0))
        if lat < 0:
            raise HardwareConfigError(f"hardware.bandwidth.latency_s: expected >= 0, got {lat}")
        speedup = bw.get("pair_speedup", 1.0)  # partial only; the others share fully (1) or not at all
        if kind == "partial_link" and (isinstance(speedup, bool) or not isinstance(speedup, (int, float))
                                       or not 1.0 <= speedup <= 2.0):
            raise HardwareConfigError(f"hardware.bandwidth.pair_speedup: expected a number in [1, 2], got {speedup!r}")
        copy = CopyModel(kind, _positive(bw, "bandwidth_GBps", "hardware.bandwidth") * GB, lat, channels,
                         pair_speedup=float(speedup) if kind == "partial_link" else 1.0)
    if csource == PROFILE:
        c = prof["compute"]
        over, per_expert = (_overhead(comp, c, k) for k in ("layer_overhead_s", "expert_overhead_s"))
        # The profile measured a scaled-down shape; the trace says what it replays. Use the tables as is:
        # profiled runs replay the same (scaled) shape the executor runs.
        compute = ComputeModel(
            "profiled", meta.hidden_size, inter,
            dense_tokens=np.asarray(c["dense_tokens"], float), dense_s=np.asarray(c["dense_s"], float),
            expert_tokens=np.asarray(c["expert_tokens"], float), expert_s=np.asarray(c["expert_s"], float),
            layer_overhead_s=over, expert_overhead_s=per_expert,
        )
    else:  # the roofline on the config's figures
        matrices = 2 if meta.model.startswith("switch") else 3
        compute = ComputeModel(
            "analytic", max(meta.hidden_size, 1), inter, matrices, 2,
            flops_per_s=_positive(comp, "peak_TFLOPS", "hardware.compute") * 1e12
            * _fraction(comp, "efficiency", 0.5, "hardware.compute"),
            mem_bytes_per_s=_positive(comp, "mem_GBps", "hardware.compute") * GB
            * _fraction(comp, "mem_efficiency", 0.8, "hardware.compute"),
        )
    return copy, compute
