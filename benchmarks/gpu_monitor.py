"""
The GPU's clock, power, energy and temperature sampled in a background thread (NVML through nvidia-ml-py),
so that every speed number can carry the state of the GPU that produced it.

Under the 700 W power cap of an H100/H200 the SM clock is set by the power controller, and a hotter die
leaks more, leaving less clock at the same power: a ratio between two modes is only meaningful with the
clock, power and temperature each mode ran at. NVML's power reading is a ~1 s average on Hopper; the
energy counter (mJ) gives joules over any window, so joules per step come from its differences.

    with GpuMonitor(index=0, period=0.1) as mon:
        ...  # work; host time stamps from time.time()
    stats = mon.window(t0, t1)  # medians and means of the samples in [t0, t1)
"""

import statistics
import threading
import time

FIELDS = ("t", "sm_mhz", "power_w", "power_inst_w", "energy_j", "temp_c", "mem_temp_c", "reasons")


class GpuMonitor:
    """Samples one GPU every `period` seconds until stopped. Without NVML (CPU machines, no nvidia-ml-py) it
    records nothing and every window is empty: the numbers it would add are then None, never invented."""

    def __init__(self, index=0, period=0.1):
        self.index, self.period = index, period
        self.samples = []  # dicts with FIELDS
        self.error = None
        self._stop = threading.Event()
        self._thread = None
        self._nvml = None

    def __enter__(self):
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception as e:  # no driver or no nvidia-ml-py: say so once, measure without it
            self.error = f"{type(e).__name__}: {e}"
            return self
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()
        return False

    def _read(self):
        nv, h = self._nvml, self._handle
        row = dict(t=time.time(), sm_mhz=nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
                   power_w=nv.nvmlDeviceGetPowerUsage(h) / 1000, energy_j=nv.nvmlDeviceGetTotalEnergyConsumption(h) / 1000,
                   temp_c=nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU), mem_temp_c=None, power_inst_w=None,
                   reasons=None)
        try:
            row["mem_temp_c"] = nv.nvmlDeviceGetFieldValues(h, [nv.NVML_FI_DEV_MEMORY_TEMP])[0].value.uiVal
        except Exception:
            pass
        try:  # the instantaneous reading (the plain one is a ~1 s average): short peaks a steady average hides
            v = nv.nvmlDeviceGetFieldValues(h, [nv.NVML_FI_DEV_POWER_INSTANT])[0]
            row["power_inst_w"] = v.value.uiVal / 1000 if v.nvmlReturn == 0 else None
        except Exception:
            pass
        try:
            row["reasons"] = nv.nvmlDeviceGetCurrentClocksEventReasons(h)
        except Exception:
            pass
        return row

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.samples.append(self._read())
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"
                return
            self._stop.wait(self.period)

    def window(self, t0, t1):
        return window_stats(self.samples, t0, t1)


def window_stats(samples, t0, t1):
    """SM clock (median), power (mean of the 1 s averages), energy per second from the counter, GPU and
    memory temperature (mean), and the share of samples with the software power cap active, over [t0, t1)."""
    inside = [s for s in samples if t0 <= s["t"] < t1]
    if len(inside) < 2:
        return dict(sm_mhz=None, power_w=None, energy_w=None, temp_c=None, mem_temp_c=None, power_capped=None,
                    power_inst_w=None, power_inst_p95_w=None, other_slowdown=None, samples=len(inside))
    dt = inside[-1]["t"] - inside[0]["t"]
    mem = [s["mem_temp_c"] for s in inside if s["mem_temp_c"] is not None]
    capped = [s["reasons"] for s in inside if s["reasons"] is not None]
    inst = sorted(s["power_inst_w"] for s in inside if s.get("power_inst_w") is not None)
    return dict(
        sm_mhz=statistics.median(s["sm_mhz"] for s in inside),
        power_w=statistics.fmean(s["power_w"] for s in inside),
        energy_w=(inside[-1]["energy_j"] - inside[0]["energy_j"]) / dt if dt > 0 else None,
        temp_c=statistics.fmean(s["temp_c"] for s in inside),
        mem_temp_c=statistics.fmean(mem) if mem else None,
        power_capped=sum(1 for r in capped if r & SW_POWER_CAP) / len(capped) if capped else None,
        power_inst_w=statistics.fmean(inst) if inst else None,
        power_inst_p95_w=inst[int(0.95 * (len(inst) - 1))] if inst else None,
        other_slowdown=sum(1 for r in capped if r & OTHER_SLOWDOWN) / len(capped) if capped else None,
        samples=len(inside))


SW_POWER_CAP = 0x4  # nvmlClocksEventReasonSwPowerCap
# hardware slowdown, software/hardware thermal slowdown, power brake: any reason the clock is held that is not the cap
OTHER_SLOWDOWN = 0x8 | 0x20 | 0x40 | 0x80
