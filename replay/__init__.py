"""The core the simulator (``sim``) and the real executor (``executor``) share.

- :mod:`replay.prepare`: a configured run made ready to replay (trace, split, steps, keys, policies, models);
- :mod:`replay.driver`: THE per-layer-step driver loop, with pluggable clock, copy and compute backends;
- :mod:`replay.results`: the replay's result and the public ``results.json`` schema; :mod:`replay.window` its
  measured window (after the warm-up); :mod:`replay.outputs` writes them;
- :mod:`replay.link`: the simulator's facts for the policy runtime's link-time budget;
- :mod:`replay.hardware`: copy and compute models of hardware (presets and measured profiles);
- :mod:`replay.channels`, :mod:`replay.serial_channel`: simulated copy channels (the simulator's copies and the
  bounds' schedules);
- :mod:`replay.bounds`, :mod:`replay.oracle`, :mod:`replay.bounds_cache`: Belady's MIN and the perfect-foresight
  schedules every result is compared with;
- :mod:`replay.errors`: the configuration errors a run reports as ``error: ...`` (exit 2);
- :mod:`replay.config_keys`: the renamed config keys (old -> new, one table), mapped wherever an old key arrives;
- :mod:`replay.run_dirs`: safe run and sweep folder names (the ``safe_name`` resolver) and a clear error when
  a folder cannot be made.

Layering: ``traces`` and ``policies`` below; ``sim`` and ``executor`` above (never importing each other);
``analysis`` on top (``tests/test_layering.py`` checks it).
"""
