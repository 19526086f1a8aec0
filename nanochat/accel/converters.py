"""
Model converters: --sparse and --fp8 as objects with the stages the trainer calls (the shape of torchtitan's
model converters). Each holds its settings; Converters holds the run's list, in the one order that works,
and calls a stage on each:
  convert(model)                       swap layers: after the model is built, before optimizers, DDP, compile
  after_optimizers(model, optimizers)  what needs the optimizers (the 2:4 re-pack after each step)
  after_wrap(model)                    after DDP, whose initial broadcast wrote the weights in place
  check_replicas(model, log)           under DDP, at each evaluation: the replicas still agree
  eager(model)                         a context for running the model eagerly (CORE, sampling)
  meta()                               what a checkpoint records for inference to rebuild the model
  from_meta(meta, device)              the converter inference needs for a checkpoint (None: none)
Inference (scripts/base_eval.py, scripts/base_sample.py, nanochat/accel/sparse_export.py) rebuilds its
converters with Converters.from_meta and never imports the trainer.
"""

from contextlib import ExitStack, nullcontext

import torch
import torch.distributed as dist

from nanochat.accel.kernel_choice import TimingCache
from nanochat.common import print0


def _silent(*_args, **_kwargs):
    pass


class SparseConverter:
    """--sparse: the MLP layers become 2:4 SemiSparseLinear, their kernels chosen for `tokens` per
    micro-batch (weighing the GEMM saving over `micro_batches` against one re-pack per step), their
    state in one SparseRuntime on `device`. fp8: the fp8 2:4 kernel (--fp8 --sparse). timing_cache: the
    run's TimingCache (nanochat/accel/kernel_choice.py; None: the default file)."""

    def __init__(self, device, backend="auto", fp8=False, tokens=None, micro_batches=1, timing_cache=None, log=print0):
        from nanochat.accel.sparse import SparseConfig
        self.device = torch.device(device)
        self.config = SparseConfig(backend=backend, fp8=fp8, tokens=tokens, micro_batches=micro_batches,
                                   timing_cache=timing_cache or TimingCache(), log=log)
        self.runtime = None
        self.num_layers = 0

    def convert(self, model):
        from nanochat.accel.sparse import SparseRuntime, convert_mlp_to_sparse
        self.runtime = SparseRuntime(self.device)
        self.num_layers = convert_mlp_to_sparse(model, self.device, self.config, self.runtime)

    def after_optimizers(self, model, optimizers):
        if self.num_layers:
            from nanochat.accel.sparse import install_refresh_hooks
            install_refresh_hooks(model, optimizers)  # re-pack after each optimizer step and checkpoint load

    def after_wrap(self, model):
        if self.num_layers:
            from nanochat.accel.sparse import refresh_sparse_weights
            refresh_sparse_weights(model)

    def check_replicas(self, model, log):
        """Every rank must prune the same 2:4 masks (identical weights after each all-reduce)."""
        if not (self.num_layers and dist.is_initialized()):
            return
        from nanochat.accel.sparse import mask_checksum
        local = mask_checksum(model)
        sums = torch.tensor([local, -local], dtype=torch.float64, device=next(model.parameters()).device)
        dist.all_reduce(sums, op=dist.ReduceOp.MAX)  # max and -min in one call
        if sums[0].item() != -sums[1].item():
            raise RuntimeError("ranks pruned different 2:4 masks: the replicas' weights have diverged")
        log(f"2:4 masks identical on all {dist.get_world_size()} ranks")

    def eager(self, model):
        return nullcontext()  # SemiSparseLinear re-packs itself when run eagerly

    def meta(self):
        return dict(sparse=self.num_layers > 0, sparse_backend=self.config.backend, sparse_layers=self.num_layers)

    @classmethod
    def from_meta(cls, meta, device):
        """The same 2:4 masks for inference: the saved backend on CUDA, the masked kernel elsewhere."""
        if not meta.get("sparse"):
            return None
        device = torch.device(device)
        backend = meta.get("sparse_backend", "auto") if device.type == "cuda" else "masked"
        return cls(device, backend=backend, log=_silent)


class Fp8Converter:
    """--fp8: the dense Linear layers become torchao Float8Linear; tokens (per micro-batch) keeps a layer
    shape in bf16 where fp8 timed slower (None: every eligible layer, --fp8-layers all). timing_cache: the
    run's TimingCache (None: time every start)."""

    def __init__(self, device, tokens=None, timing_cache=None, log=print0):
        self.device = torch.device(device)
        self.tokens, self.timing_cache, self.log = tokens, timing_cache, log
        self.converted = []

    def convert(self, model):
        from nanochat.accel.fp8 import convert_to_float8
        self.converted = convert_to_float8(model, self.device, log=self.log, tokens=self.tokens, cache=self.timing_cache)

    def after_optimizers(self, model, optimizers):
        pass

    def after_wrap(self, model):
        pass

    def check_replicas(self, model, log):
        pass

    def eager(self, model):
        """Float8Linear layers run as bf16 nn.Linear: eager sampling feeds one token at a time, which fp8
        GEMMs cannot take, and a Float8 tensor rejects autocast's casts."""
        from nanochat.accel.fp8 import bf16_linears
        return bf16_linears(model)

    def meta(self):
        return dict(fp8=True)

    @classmethod
    def from_meta(cls, meta, device):
        """None: an fp8 checkpoint holds plain weights and inference runs it in bf16 (eager sampling feeds
        one token at a time, which fp8 GEMMs cannot take)."""
        return None


# Sparse first, then fp8 on what is left dense: the 2:4 layers carry their own fp8 kernel.
ORDER = (SparseConverter, Fp8Converter)


class Converters:
    """The run's converters in ORDER; each stage runs on every one of them."""

    def __init__(self, converters=()):
        self.converters = sorted((c for c in converters if c is not None), key=lambda c: ORDER.index(type(c)))

    @classmethod
    def from_meta(cls, meta, device):
        return cls(kind.from_meta(meta, device) for kind in ORDER)

    def _each(self, stage, *args):
        for c in self.converters:
            getattr(c, stage)(*args)

    def convert(self, model):
        self._each("convert", model)

    def after_optimizers(self, model, optimizers):
        self._each("after_optimizers", model, optimizers)

    def after_wrap(self, model):
        self._each("after_wrap", model)

    def check_replicas(self, model, log):
        self._each("check_replicas", model, log)

    def eager(self, model):
        stack = ExitStack()
        for c in self.converters:
            stack.enter_context(c.eager(model))
        return stack

    def meta(self):
        """For the checkpoint: sparse and fp8 are False unless a converter says otherwise."""
        meta = dict(sparse=False, fp8=False)
        for c in self.converters:
            meta.update(c.meta())
        return meta
