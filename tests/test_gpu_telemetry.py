"""GPU telemetry (pynvml): what it reports without NVML, and its summary arithmetic on a fake NVML (no GPU)."""

from __future__ import annotations

import sys

from executor.gpu_telemetry import NvmlSampler


def test_telemetry_says_when_it_is_not_available(monkeypatch):
    summary = NvmlSampler().start().stop()
    if summary["available"]:
        assert summary["samples"] >= 2 and summary["device"]
    else:  # this machine: no NVML library / driver
        assert summary["reason"] and set(summary) == {"available", "reason", "source"}
    monkeypatch.setitem(sys.modules, "pynvml", None)
    s = NvmlSampler().stop()
    assert s == {"available": False, "reason": s["reason"], "source": "pynvml"} and "not installed" in s["reason"]


class FakeNvml:
    NVML_PCIE_UTIL_TX_BYTES, NVML_PCIE_UTIL_RX_BYTES = 0, 1

    def __init__(self):
        self.rx = iter([100, 300])
        self.shut = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetHandleByUUID(self, uuid):
        raise RuntimeError("unknown uuid")

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"Fake GPU"

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("M", (), {"used": 2 << 30})()

    def nvmlDeviceGetPcieThroughput(self, h, which):
        return next(self.rx) if which == 1 else 0

    def nvmlDeviceGetUtilizationRates(self, h):
        raise RuntimeError("Not Supported")


def test_telemetry_summary_from_samples():
    """The summary arithmetic on a fake NVML (two samples: at start and at stop); unsupported metrics say so."""
    fake = FakeNvml()
    s = NvmlSampler(uuid="GPU-x", interval_s=60, nvml=fake).start().stop()
    assert s["available"] and s["device"] == "Fake GPU" and s["samples"] == 2 and fake.shut
    assert s["pcie_rx_bytes_per_s"] == {"mean": 200 * 1024.0, "max": 300 * 1024.0, "min": 100 * 1024.0}
    assert s["memory_used_bytes"]["max"] == 2 << 30 and s["pcie_tx_bytes_per_s"]["mean"] == 0.0
    assert s["gpu_util_pct"] is None and "Not Supported" in s["unsupported"]["gpu_util_pct"]
