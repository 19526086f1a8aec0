"""
The fast linears, --sparse and --fp8, as one model converter with a plan per layer: its format (dense or 2:4)
and precision (bf16 or fp8). The four kernels behind the plan: nn.Linear (dense bf16), torchao's Float8Linear
(dense fp8, nanochat/accel/fp8.py), SemiSparseLinear with the cuSPARSELt or masked kernel (2:4 bf16) or the
fp8 2:4 kernel (nanochat/accel/sparse/). The stages the trainer calls (the shape of torchtitan's model
converters):
  convert(model)              swap layers per the plan: after the model is built, before optimizers, DDP, compile
  post_optimizer_hook(model)  after each optimizer step (the trainer registers it): re-pack the 2:4 layers it changed
  sync(model)                 re-pack what changed outside an optimizer step: after a checkpoint load and after
                              DDP's initial broadcast (both write the weights in place)
  check_replicas(model, log)  under DDP, at each evaluation: the replicas still agree
  eager(model)                a context for running the model eagerly (CORE, sampling)
  meta()                      what a checkpoint records: the flags and what the plan turned into on this machine
  from_meta(meta, device)     the converter inference needs for a checkpoint
Inference (scripts/base_eval.py, scripts/base_sample.py, nanochat/accel/sparse_export.py) rebuilds it with
LinearConverter.from_meta and never imports the trainer.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from nanochat.accel.kernel_choice import TimingCache
from nanochat.common import print0


def _silent(*_args, **_kwargs):
    pass


@dataclass(frozen=True)
class LayerPlan:
    format: str = "dense"  # dense | 2:4
    precision: str = "bf16"  # bf16 | fp8



class LinearConverter:
    """sparse: the MLP layers become 2:4 SemiSparseLinear (backend: --sparse-backend), their kernels chosen for
    `tokens` per micro-batch (weighing the GEMM saving over `micro_batches` against one re-pack per step), their
    state in one SparseRuntime on `device`. fp8: the other Linear layers become torchao Float8Linear where fp8
    timed fast enough at `tokens` (fp8_layers "auto"; "all": every eligible layer), the 2:4 layers use the fp8
    2:4 kernel. timing_cache: the run's TimingCache (kernel_choice.default_timing_cache; None: one in memory)."""

    def __init__(self, device, sparse=False, fp8=False, backend="auto", tokens=None, micro_batches=1, fp8_layers="auto",
                 timing_cache=None, log=print0):
        self.device = torch.device(device)
        self.sparse, self.fp8, self.backend, self.tokens = sparse, fp8, backend, tokens
        self.micro_batches, self.fp8_layers, self.log = micro_batches, fp8_layers, log
        self.timing_cache = timing_cache if timing_cache is not None else TimingCache()
        self.runtime = None
        self.plan = {}  # layer name -> LayerPlan, as converted (dense bf16 layers left out)
        self.sparse_modules = []  # the SemiSparseLinear layers, which sync() re-packs

    def planned(self, model):
        """{name: LayerPlan} of the model's Linear layers that sparse and fp8 ask to change: 2:4 for the MLP
        layers (sparse/convert.py, sparse_target), fp8 for the 2:4 layers and the dense layers fp8 can take
        (fp8.py, fp8_module_filter). What a machine cannot run falls back at convert (logged)."""
        from nanochat.accel.fp8 import fp8_module_filter
        from nanochat.accel.sparse.convert import sparse_target
        plan = {}
        for name, mod in model.named_modules():
            if type(mod) is not nn.Linear:
                continue
            fmt = "2:4" if self.sparse and sparse_target(name, mod) else "dense"
            fp8 = self.fp8 and (fmt == "2:4" or fp8_module_filter(mod, name))
            if (fmt, fp8) != ("dense", False):
                plan[name] = LayerPlan(fmt, "fp8" if fp8 else "bf16")
        return plan

    def convert(self, model):
        """Swap the planned layers, 2:4 first (its fp8 kernel is its own), then torchao's fp8 on the dense ones;
        self.plan is what this machine runs. Packs the 2:4 layers."""
        plan = self.planned(model)
        self.plan, self.sparse_modules = {}, []
        sparse_names = {n for n, p in plan.items() if p.format == "2:4"}
        if sparse_names:
            from nanochat.accel.sparse import SemiSparseLinear, SparseConfig, SparseRuntime, convert_mlp_to_sparse
            config = SparseConfig(backend=self.backend, fp8=self.fp8, tokens=self.tokens, micro_batches=self.micro_batches,
                                  timing_cache=self.timing_cache, log=self.log)
            self.runtime = SparseRuntime(self.device)
            convert_mlp_to_sparse(model, self.device, config, self.runtime, names=sparse_names)
            for name in sorted(sparse_names):
                layer = model.get_submodule(name)
                if isinstance(layer, SemiSparseLinear):  # none where 2:4 cannot run (logged)
                    self.sparse_modules.append(layer)
                    self.plan[name] = LayerPlan("2:4", "fp8" if layer.kernel.name == "fp8" else "bf16")
        fp8_names = {n for n, p in plan.items() if p.precision == "fp8" and n not in self.plan}  # 2:4 fell back: dense fp8
        if self.fp8:
            from nanochat.accel.fp8 import convert_to_float8
            tokens = self.tokens if self.fp8_layers == "auto" else None
            for name in convert_to_float8(model, self.device, log=self.log, tokens=tokens, cache=self.timing_cache,
                                          names=fp8_names):
                self.plan[name] = LayerPlan("dense", "fp8")

    def num_sparse_layers(self):
        return sum(p.format == "2:4" for p in self.plan.values())

    def post_optimizer_hook(self, model):
        """Re-pack the 2:4 layers whose weights the optimizer step changed (once per step, never per
        micro-batch). The trainer registers it on each optimizer (register_step_post_hook)."""
        self.sync(model)

    def sync(self, model):
        """Re-pack every 2:4 layer whose weight changed since its last pack (a no-op otherwise). Returns how
        many packed."""
        return sum(int(m.refresh()) for m in self.sparse_modules)

    def check_replicas(self, model, log):
        """Every rank must prune the same 2:4 masks (identical weights after each all-reduce)."""
        if not (self.num_sparse_layers() and dist.is_initialized()):
            return
        from nanochat.accel.sparse import mask_checksum
        local = mask_checksum(model)
        sums = torch.tensor([local, -local], dtype=torch.float64, device=next(model.parameters()).device)
        dist.all_reduce(sums, op=dist.ReduceOp.MAX)  # max and -min in one call
        if sums[0].item() != -sums[1].item():
            raise RuntimeError("ranks pruned different 2:4 masks: the replicas' weights have diverged")
        log(f"2:4 masks identical on all {dist.get_world_size()} ranks")

    def eager(self, model):
        """With fp8, Float8Linear layers run as bf16 nn.Linear: eager sampling feeds one token at a time, which
        fp8 GEMMs cannot take, and a Float8 tensor rejects autocast's casts. (The 2:4 layers are packed by
        post_optimizer_hook and sync.)"""
        if not self.fp8:
            return nullcontext()
        from nanochat.accel.fp8 import bf16_linears
        return bf16_linears(model)

    def meta(self):
        """For the checkpoint: sparse (some layer runs 2:4), fp8 (the run asked for --fp8: base_eval reports
        it), and with each flag how many layers run so on this machine."""
        meta = dict(sparse=False, fp8=self.fp8)
        if self.fp8:
            meta.update(fp8_layers=sum(p.precision == "fp8" for p in self.plan.values()))
        if self.sparse:
            n = self.num_sparse_layers()
            meta.update(sparse=n > 0, sparse_backend=self.backend, sparse_layers=n)
        return meta

    @classmethod
    def from_meta(cls, meta, device):
        """The same 2:4 masks for inference: the saved backend on CUDA, the masked kernel elsewhere. fp8 layers
        are left bf16: an fp8 checkpoint holds plain weights, and eager sampling feeds one token at a time,
        which fp8 GEMMs cannot take."""
        device = torch.device(device)
        backend = meta.get("sparse_backend", "auto") if device.type == "cuda" else "masked"
        return cls(device, sparse=bool(meta.get("sparse")), backend=backend, log=_silent)
