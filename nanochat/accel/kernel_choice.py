"""
Choosing a kernel for each op before training, from GPU timings: one loop (choose), one rule (pays), its
margins and one cache, for the three choices the trainer makes:
  "cusparselt"  each forward and grad-input GEMM of a --sparse layer: cuSPARSELt 2:4 against the dense GEMM on
                the same masked weight (nanochat/accel/sparse/convert.py, sparse/tune.py); margin "2:4"
  "fp8 2:4"     the same ops with --fp8 --sparse: the fp8 2:4 kernel against dense fp8; margin "2:4"
  "fp8 layer"   each layer shape of --fp8: torchao's fp8 Linear against bf16 (nanochat/accel/fp8.py); margin "fp8"

The timings (hardware.time_gpu_ms) are bursts of a few ms. Whether --sparse runs 2:4 GEMMs at all is decided
before this, from whole training steps (step_gate.py): a burst cannot see the clock a run's whole mix of
kernels leaves the GPU at under its power cap. Where 2:4 is on, each op takes the kernel that is faster in
its burst. The fp8 layer choice keeps a margin for what the burst misses (its casts fuse in the model).

The rule: the faster-timed kernel runs iff

    (base_ms - margin * fast_ms) * micro_batches > prep_ms

where prep_ms is what it costs once per optimizer step beyond the base kernel (packing a 2:4 operand instead
of casting a dense one).
"""

import json
import math
import os
from typing import NamedTuple

import torch

from nanochat.common import device_name, get_base_dir, rank0s

MARGINS = {
    # 2:4 is switched on or off by whole-step records (step_gate.py); inside a run where it is on, an op runs 2:4
    # when its GEMM is faster by more than its packing costs per step.
    "2:4": 1.0,
    # fp8's casts fuse with the norm or activation before them in the compiled model and c_q/c_k/c_v share one,
    # so a layer does better in fp8 inside the step than alone: it stays fp8 unless it timed > 10% slower
    # (d12 with every layer in fp8 ran 0.974x of bf16, with this choice 0.999x).
    "fp8": 1 / 1.10,
}


def pays(base_ms, fast_ms, margin, micro_batches=1, prep_ms=0.0):
    """True when the kernel timed at fast_ms should replace the one timed at base_ms (the rule above; margin:
    MARGINS of the choice)."""
    return (base_ms - margin * fast_ms) * micro_batches > prep_ms


class Choice(NamedTuple):
    """One op's choice: fast (the fast kernel runs), the timings it was made from (as cached) and the prep cost
    it weighed (ms per optimizer step)."""
    fast: bool
    timings: dict
    prep_ms: float


def choose(shapes, ops, key, time_fn, cost, cache, margin, micro_batches=1, force=None, log=None, describe=None):
    """{shape: {op: Choice}}: for each layer shape and op, whether the fast kernel replaces the base one, by
    pays() on timings read from `cache` (a TimingCache) or measured and kept there. Every rank takes rank 0's
    choices (timings differ a little between ranks; the kernels must not). The per-choice parts:
      shapes                    the layer shapes to choose for (by_shape's keys), each timed once
      ops                       the ops of a layer chosen apart, e.g. ("fwd", "dgrad")
      key(shape, op)            the cache key of the op's timings (timing_key); ops under one key share one
                                entry, measured once
      time_fn(shape, op)        measures what the cache keeps under that key
      cost(shape, op, timings)  (base_ms, fast_ms, prep_ms) of the op (prep_ms may be measured here, uncached)
      force                     None, or True / False: every op on the fast / base kernel (timed all the same)
      describe(shape, choices)  the log line of a shape, written through log
    Saves the cache (what this run measured)."""
    chosen = {}
    for shape in shapes:
        chosen[shape] = {}
        for op in ops:
            timings = cache.measured(key(shape, op), lambda: time_fn(shape, op))
            base_ms, fast_ms, prep_ms = cost(shape, op, timings)
            fast = pays(base_ms, fast_ms, margin, micro_batches, prep_ms) if force is None else force
            chosen[shape][op] = Choice(fast, timings, prep_ms)
    cache.save()
    chosen = rank0s(chosen)
    if describe is not None:
        for shape in shapes:
            log(describe(shape, chosen[shape]))
    return chosen


def by_shape(layers):
    """{(out_features, in_features): [(name, layer), ...]} of (name, Linear layer) pairs, in order."""
    shapes = {}
    for name, layer in layers:
        shapes.setdefault((layer.out_features, layer.in_features), []).append((name, layer))
    return shapes


def short_names(names):
    """The layers' own names, e.g. "c_fc,c_proj" for transformer.h.*.mlp.c_fc and .c_proj."""
    return ",".join(sorted({n.split(".")[-1] for n in names})) or "-"


def timing_key(choice, device, *parts):
    """A TimingCache key: the choice, the device and the torch version (both decide what a timing is), then
    the choice's own parts (library versions, shape, token count, op)."""
    return TimingCache.key(choice, device_name(device), f"torch {torch.__version__}", *parts)


CACHE_VERSION = 2
CACHE_FILE = "kernel_timings.json"


def default_timing_cache(log=print):
    """The timing cache a run keeps between starts: <base dir>/kernel_timings.json."""
    return TimingCache(os.path.join(get_base_dir(), CACHE_FILE), log=log)


def _valid_entry(v, depth=0):
    """A timing entry: a dict of finite non-negative numbers (an algorithm id counts), one level of nesting."""
    if not isinstance(v, dict) or not v:
        return False
    for x in v.values():
        if isinstance(x, dict):
            if depth > 0 or not _valid_entry(x, depth + 1):
                return False
        elif isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            return False
    return True


class TimingCache:
    """Kernel timings on disk, so that the next run starts without timing again. A key names everything its
    numbers depend on (the choice, GPU, library versions, shape, token count). A file that cannot be read, of
    another version, or with malformed entries loses what is bad, with one warning line, and is rewritten.
    path None: a cache in memory only, so every start times again."""

    def __init__(self, path=None, log=print):
        self.path, self.log, self.entries = path, log, {}
        self.changed = False  # save() writes only what this run added
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    data = json.load(f)
                if data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
                    raise ValueError(f"version {data.get('version')!r}, expected {CACHE_VERSION}")
                self.entries = {k: v for k, v in data["entries"].items() if _valid_entry(v)}
            except (OSError, ValueError, AttributeError) as e:
                log(f"Warning: ignoring the kernel timing cache {path} ({type(e).__name__}: {e}); it will be rewritten")

    @staticmethod
    def key(*parts):
        return "|".join(str(p) for p in parts)

    def get(self, key):
        return self.entries.get(key)

    def put(self, key, entry):
        self.entries[key] = entry
        self.changed = True

    def measured(self, key, measure):
        """The cached entry of key, or measure()'s result, kept."""
        entry = self.get(key)
        if entry is None:
            entry = measure()
            self.put(key, entry)
        return entry

    def save(self):
        if not (self.path and self.changed):
            return
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            tmp = f"{self.path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"version": CACHE_VERSION, "entries": self.entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
            self.changed = False
        except OSError as e:
            self.log(f"Warning: could not write the kernel timing cache {self.path} ({e})")
