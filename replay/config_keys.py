"""The run config's renamed keys, in ONE table (:data:`RENAMED`, :data:`TRANSLATED`), and the three places an old
key can come from, each mapped onto the new keys with a :class:`DeprecatedKeyWarning` that names the new one:

- a command-line override (``python -m sim hardware.bandwidth.bandwidth_gbps=12``): :func:`rewrite_overrides`
  runs on the arguments before hydra composes them (an old key is no longer in the config, so hydra would refuse
  it);
- a sweep's parameters in an experiment file (``hydra.sweeper.params``): :class:`LegacyKeys`, a hydra callback,
  rewrites them the same way before the sweeper expands them;
- a composed config that holds an old key (a config file or experiment written for the old keys, an older run's
  saved ``.hydra/config.yaml``): :func:`normalise`, which the simulator and the executor apply to every config
  before they read it.

A plain rename moves the value. A translated key's value maps onto other keys: the old ``bandwidth.model`` mixed
where the figures come from (``profiled``) with how concurrent copies share the link (``alpha_beta``,
``shared_link``, ``partial_link``), now ``bandwidth.source`` and ``bandwidth.sharing``."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from hydra.experimental.callback import Callback

from .errors import RunConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# old key -> new key: the value moves unchanged
RENAMED = {
    "hardware.bandwidth.bandwidth_gbps": "hardware.bandwidth.bandwidth_GBps",
    "hardware.compute.tflops": "hardware.compute.peak_TFLOPS",
    "hardware.compute.mem_gbps": "hardware.compute.mem_GBps",
    "predictor.min_score": "prefetch.min_score",
    "predictor.max_per_layer": "prefetch.max_per_layer",
    "executor.tier_dir": "paths.tier_dir",
    "bounds.cache_dir": "paths.bounds_dir",
    "trace.cache_dir": "paths.traces_dir",
}
# old key -> what its value sets now (see :func:`_copy_model`, :func:`_compute_model`)
TRANSLATED = {
    "hardware.bandwidth.model": "hardware.bandwidth.source and hardware.bandwidth.sharing",
    "hardware.compute.model": "hardware.compute.source",
}
# nodes that only held renamed keys: dropped once empty
EMPTIED = ("bounds",)
# the old copy models that were a link topology: how concurrent copies share the link
OLD_COPY_MODELS = {"constant": "independent", "alpha_beta": "independent", "shared_link": "shared",
                   "partial_link": "partial"}


class DeprecatedKeyWarning(FutureWarning):
    """A config key was given under its old name (still accepted; the message names the new one)."""


def _warn(old: str, new: str) -> None:
    warnings.warn(f"config key {old} is deprecated: use {new}", DeprecatedKeyWarning, stacklevel=3)


# [~|+|++]key[@package][=value]: a hydra override (flags and their values never match an old key)
_OVERRIDE = re.compile(r"(?P<prefix>~|\+\+|\+)?(?P<key>[A-Za-z_][\w.]*)(?P<rest>(@[\w.]*)?(=.*)?)", re.S)


def rewrite_key(key: str) -> str:
    """One override's key (with its ``+``/``++``/``~`` prefix): an old key renamed (with the warning); a
    translated one forced into the config (``++``) for :func:`normalise` to translate after composition; any
    other key unchanged."""
    m = _OVERRIDE.fullmatch(key)
    if not m or m["rest"]:
        return key
    prefix, name = m["prefix"] or "", m["key"]
    if name in RENAMED:
        _warn(name, RENAMED[name])
        # the new key exists in the config: ``+`` (add) would fail on it, ``++`` adds or overrides
        return ("++" if prefix.startswith("+") else prefix) + RENAMED[name]
    if name in TRANSLATED and prefix != "~":
        return "++" + name
    return key


def rewrite_overrides(args: list[str]) -> list[str]:
    """Command-line arguments with every old key mapped (:func:`rewrite_key`); everything else unchanged."""
    out = []
    for arg in args:
        m = _OVERRIDE.fullmatch(arg)
        head = (m["prefix"] or "") + m["key"] if m else ""
        out.append(rewrite_key(head) + arg[len(head):] if m else arg)
    return out


class LegacyKeys(Callback):
    """Maps old keys in a sweep's ``hydra.sweeper.params`` (an experiment file written for the old keys) before
    the sweeper expands them, so every job gets the new keys (and ``multirun.yaml`` records them)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        from omegaconf import OmegaConf, open_dict, read_write

        params = config.hydra.sweeper.get("params")
        raw = OmegaConf.to_container(params, resolve=False) if params else {}
        new = {rewrite_key(k): v for k, v in raw.items()}  # warns once per old key
        if list(new) != list(raw):
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.sweeper.params = new


def normalise(cfg):
    """``cfg`` (a composed config, or a plain dict) with every old key it holds moved to its new key (in place;
    returned for convenience). Each old key found is named in a :class:`DeprecatedKeyWarning`. Raises
    :class:`~replay.errors.RunConfigError` for a translated key whose value has no new equivalent."""
    from omegaconf import DictConfig, open_dict

    if isinstance(cfg, DictConfig):
        with open_dict(cfg):
            _normalise(cfg)
    else:
        _normalise(cfg)
    return cfg


def _normalise(cfg) -> None:
    for old, new in RENAMED.items():
        found, value = _pop(cfg, old)
        if found:
            _warn(old, new)
            _put(cfg, new, value)
    for old, translate in (("hardware.bandwidth.model", _copy_model), ("hardware.compute.model", _compute_model)):
        found, value = _pop(cfg, old)
        if found:
            _warn(old, TRANSLATED[old])
            translate(_node(cfg, old.rpartition(".")[0]), value)
    for name in EMPTIED:
        if name in cfg and not cfg[name]:
            del cfg[name]


def _copy_model(bw, model) -> None:
    """The old ``hardware.bandwidth.model`` on the new keys: ``profiled`` is where the figures come from (the
    profile; ``sharing`` keeps its value, ``auto`` when absent), the others a link topology (figures given in
    the config: a source of ``profile`` no longer holds and becomes null, unstated). ``constant`` was
    ``alpha_beta`` without the latency."""
    if model == "profiled":
        bw["source"] = "profile"
        return
    if model not in OLD_COPY_MODELS:
        raise RunConfigError(f"hardware.bandwidth.model (deprecated): expected {'|'.join(OLD_COPY_MODELS)}|profiled, "
                             f"got {model!r}")
    bw["sharing"] = OLD_COPY_MODELS[model]
    if bw.get("source") == "profile":
        bw["source"] = None
    if model == "constant":
        bw["latency_s"] = 0.0


def _compute_model(comp, model) -> None:
    """The old ``hardware.compute.model``: ``profiled`` (the profile's tables) or ``analytic`` (the roofline on
    the config's figures: a source of ``profile`` no longer holds and becomes null, unstated)."""
    if model == "profiled":
        comp["source"] = "profile"
    elif model == "analytic":
        if comp.get("source") == "profile":
            comp["source"] = None
    else:
        raise RunConfigError(f"hardware.compute.model (deprecated): expected analytic|profiled, got {model!r}")


def _node(cfg, path: str):
    """The node at dotted ``path`` (made, empty, where missing)."""
    node = cfg
    for part in path.split("."):
        if part not in node or node[part] is None:
            node[part] = {}
        node = node[part]
    return node


def _pop(cfg, dotted: str) -> tuple[bool, object]:
    """(whether ``dotted`` is in ``cfg``, its value unresolved), removing it."""
    from omegaconf import DictConfig, OmegaConf

    *parents, key = dotted.split(".")
    node = cfg
    for part in parents:
        node = node.get(part) if hasattr(node, "get") else None
        if node is None:
            return False, None
    if not hasattr(node, "keys") or key not in node:
        return False, None
    if isinstance(node, DictConfig):  # keep an interpolation as written, do not resolve it here
        value = OmegaConf.to_container(node, resolve=False)[key]
    else:
        value = node[key]
    del node[key]
    return True, value


def _put(cfg, dotted: str, value) -> None:
    parent, _, key = dotted.rpartition(".")
    _node(cfg, parent)[key] = value


def compose_config(overrides: list[str] = (), **kwargs):
    """The run config composed from Python (tests, benchmarks, ``executor profile loop``) as the command line
    composes it: overrides rewritten, the result normalised. ``kwargs`` go to hydra's ``compose``."""
    from hydra import compose, initialize_config_dir

    from .run_dirs import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=rewrite_overrides(list(overrides)), **kwargs)
    return normalise(cfg)
