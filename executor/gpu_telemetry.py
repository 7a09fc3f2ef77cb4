"""GPU telemetry from NVML (pynvml) during an executor run: memory used, PCIe throughput, GPU utilisation.

``NvmlSampler(...).start()`` samples on a background thread every ``interval_s``; ``stop()`` returns the summary
written under ``results.json["telemetry"]``. Without pynvml, without a driver or without a matching GPU the
summary is ``{"available": false, "reason": ...}``; a metric the device does not support is listed under
``unsupported`` with NVML's message. Only measured samples are summarised, nothing is filled in.

NVML's PCIe counters are from the GPU's side: ``rx`` is host -> GPU (expert copies), ``tx`` GPU -> host; each
reading is NVML's own average over a ~20 ms window, in KB/s, reported here in bytes/s.
"""

from __future__ import annotations

import threading
import time


def _stats(xs: list[float]) -> dict | None:
    if not xs:
        return None
    return {"mean": sum(xs) / len(xs), "max": max(xs), "min": min(xs)}


class NvmlSampler:
    METRICS = ("memory_used_bytes", "pcie_tx_bytes_per_s", "pcie_rx_bytes_per_s", "gpu_util_pct")

    def __init__(self, index: int = 0, uuid: str | None = None, interval_s: float = 0.1, nvml=None):
        self.interval_s = interval_s
        self.reason: str | None = None
        self.samples: dict[str, list[float]] = {m: [] for m in self.METRICS}
        self.unsupported: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._t = [0.0, 0.0]
        self.nvml, self.handle, self.device = nvml, None, None
        try:
            if self.nvml is None:
                import pynvml

                self.nvml = pynvml
        except ImportError as exc:
            self.reason = f"pynvml is not installed ({exc})"
            return
        try:
            self.nvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded / ...: no usable GPU driver
            self.reason = f"NVML could not start: {exc} ({type(exc).__name__})"
            self.nvml = None
            return
        try:
            self.handle = None
            if uuid:
                try:
                    self.handle = self.nvml.nvmlDeviceGetHandleByUUID(uuid)
                except Exception:
                    self.handle = None
            if self.handle is None:
                self.handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
            name = self.nvml.nvmlDeviceGetName(self.handle)
            self.device = name.decode() if isinstance(name, bytes) else str(name)
        except Exception as exc:
            self.reason = f"NVML has no GPU {uuid or index}: {exc} ({type(exc).__name__})"
            self._shutdown()

    @property
    def available(self) -> bool:
        return self.reason is None

    def _read(self, metric: str) -> float:
        n, h = self.nvml, self.handle
        if metric == "memory_used_bytes":
            return float(n.nvmlDeviceGetMemoryInfo(h).used)
        if metric == "pcie_tx_bytes_per_s":
            return n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_TX_BYTES) * 1024.0
        if metric == "pcie_rx_bytes_per_s":
            return n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_RX_BYTES) * 1024.0
        return float(n.nvmlDeviceGetUtilizationRates(h).gpu)

    def sample(self) -> None:
        for m in self.METRICS:
            if m in self.unsupported:
                continue
            try:
                v = self._read(m)
            except Exception as exc:  # NotSupported on this board, or a lost device: say so, keep no value
                self.unsupported[m] = f"{exc} ({type(exc).__name__})"
                continue
            with self._lock:
                self.samples[m].append(v)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> NvmlSampler:
        if self.available and self._thread is None:
            self._t[0] = time.perf_counter()
            self.sample()
            self._thread = threading.Thread(target=self._loop, daemon=True, name="nvml-sampler")
            self._thread.start()
        return self

    def stop(self) -> dict:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None
            self.sample()
            self._t[1] = time.perf_counter()
        self._shutdown()
        return self.summary()

    def _shutdown(self) -> None:
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass
            self.nvml = None

    def summary(self) -> dict:
        if not self.available:
            return {"available": False, "reason": self.reason, "source": "pynvml"}
        with self._lock:
            out = {m: _stats(xs) for m, xs in self.samples.items()}
            n = max((len(xs) for xs in self.samples.values()), default=0)
        out.update(available=True, source="pynvml", device=self.device, interval_s=self.interval_s, samples=n,
                   duration_s=max(0.0, self._t[1] - self._t[0]), unsupported=dict(self.unsupported))
        return out
