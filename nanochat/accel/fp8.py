"""FP8 training: dense Linear layers through torchao.float8 (the 2:4 sparse MLP layers of --fp8 --sparse
have their own fp8 kernel, nanochat/accel/sparse/fp8_kernel.py: the converter's plan gives this module only
the dense layers, nanochat/accel/converters.py).

Nothing here imports torchao at module import time: CPU machines (and CI) never need it.

Dense recipe: tensorwise scaling (one scale per tensor, cuBLAS fp8 GEMMs). torchao documents it
as its fastest recipe and upstream nanochat measured it faster end to end than rowwise
(d26 on 8xH100: 740K tok/s tensorwise vs 564K rowwise, 630K bf16). benchmarks/bench_mlp_fp8.py
times both on our MLP shapes.

Per layer shape, fp8 pays only where its GEMMs save more than its casts cost: narrow layers (d768)
ran slower in fp8 than in bf16. Given the token count of a micro-batch, convert_to_float8 times one
layer's forward + backward both ways and leaves a shape in bf16 where fp8 is clearly slower (the rule and
margin of nanochat/accel/kernel_choice.py; logged).
"""

import time
import types
from contextlib import contextmanager

import torch
import torch.nn as nn

from nanochat.accel.hardware import FP8_TOKEN_ALIGN, fp8_supported, round_up, time_gpu_ms, torchao_version
from nanochat.accel.kernel_choice import MARGINS, TimingCache, by_shape, choose, short_names, timing_key
from nanochat.common import print0


# -----------------------------------------------------------------------------
# Dense fp8: torchao.float8

def fp8_module_filter(mod, fqn, skipped=None):
    """Which Linear layers convert_to_float8 swaps. Dims that are not multiples of 16 are
    left in bf16 (fp8 GEMMs cannot take them) and their names appended to `skipped`."""
    if type(mod) is not nn.Linear:
        return False  # subclasses (a 2:4 layer, a Float8Linear) are converted already
    if fqn == "lm_head" or fqn.endswith(".lm_head"):
        return False  # logits stay in bf16/fp32: small share of FLOPs, sensitive to precision
    if mod.in_features % 16 != 0 or mod.out_features % 16 != 0:
        if skipped is not None:
            skipped.append(f"{fqn} ({mod.out_features}x{mod.in_features})")
        return False
    return True


def _linear_step(layer, x):
    return layer(x)


def time_linear_ms(out_features, in_features, tokens, device):
    """{bf16_ms, fp8_ms}: GPU ms of one linear layer's forward + backward (output, grad-input, grad-weight) at
    this token count, as the trainer runs it: fp32 master weight under bf16 autocast, compiled with static
    shapes (torch.compile fuses fp8's casts; a hand-written fp8 layer compiled with dynamic shapes lost even at
    d20's MLP shapes, where fp8 wins in the model), as nn.Linear and as torchao's tensorwise Float8Linear.
    Compiles each once."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    device = torch.device(device)
    T = round_up(tokens, FP8_TOKEN_ALIGN)
    g = torch.Generator(device=device).manual_seed(out_features * 131 + in_features)
    x = torch.randn(T, in_features, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
    gy = torch.randn(T, out_features, device=device, dtype=torch.bfloat16, generator=g)
    step = torch.compile(_linear_step, dynamic=False)
    times = {}
    for kind in ("bf16", "fp8"):
        holder = nn.Sequential(nn.Linear(in_features, out_features, bias=False, device=device))
        if kind == "fp8":
            convert_to_float8_training(holder, config=Float8LinearConfig.from_recipe_name("tensorwise"))
        layer = holder[0]

        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                y = step(layer, x)
            y.backward(gy)
        # each shape and kind is one more compiled entry of _linear_step: past dynamo's default limit (8)
        # it would silently run eager and time the wrong thing
        with torch._dynamo.config.patch(recompile_limit=1024):
            times[f"{kind}_ms"] = time_gpu_ms(run)
    return times


def choose_fp8_shapes(model, tokens, device, log=print0, time_fn=time_linear_ms, margin=MARGINS["fp8"], cache=None,
                      names=None):
    """{(out, in): True for fp8} over the shapes of the layers convert_to_float8 may swap (of `names` when
    given), by kernel_choice's
    rule: fp8 iff bf16's forward + backward at `tokens` per micro-batch beats margin times fp8's. Timings
    through `cache` (a TimingCache; None: one in memory, every start times again). One line per shape in the
    log. Under torch.distributed every rank takes rank 0's choice."""
    cache = cache if cache is not None else TimingCache()
    shapes = by_shape((fqn, mod) for fqn, mod in model.named_modules()
                      if fp8_module_filter(mod, fqn) and (names is None or fqn in names))

    def describe(shape, chosen):
        (N, K), fast, t = shape, chosen["layer"].fast, chosen["layer"].timings
        return (f"fp8: {len(shapes[shape])} layers of weight {N}x{K} ({short_names(n for n, _ in shapes[shape])}) "
                f"{'in fp8' if fast else 'stay bf16'}: forward + backward {t['fp8_ms']:.3f} ms in fp8, "
                f"{t['bf16_ms']:.3f} ms in bf16 at T={tokens}")
    start = time.perf_counter()
    chosen = choose(
        shapes, ("layer",),
        key=lambda shape, _op: timing_key("fp8 layer", device, f"torchao {torchao_version()}", "{}x{}".format(*shape), f"T{tokens}"),
        time_fn=lambda shape, _op: time_fn(*shape, tokens, device),
        cost=lambda _shape, _op, t: (t["bf16_ms"], t["fp8_ms"], 0.0),
        cache=cache, margin=margin, log=log, describe=describe)
    if shapes:
        how = "timed or read from the timing cache" if cache.path else "timed"
        log(f"fp8: {len(shapes)} layer shapes {how} in {time.perf_counter() - start:.1f}s (--fp8-layers all skips this)")
    return {shape: c["layer"].fast for shape, c in chosen.items()}


def convert_to_float8(model, device, log=print0, recipe="tensorwise", tokens=None, time_fn=time_linear_ms, cache=None,
                      names=None):
    """Swap the transformer's nn.Linear layers (those in `names`, the converter's plan, when given) for
    torchao Float8Linear, in place.
    Call before torch.compile and DDP. tokens (per micro-batch, tensorwise only): convert only the layer
    shapes choose_fp8_shapes keeps in fp8 at that count (timings through cache, a TimingCache; None: one in
    memory); None converts every eligible layer. Returns the names of the converted layers ([] when fp8 is not
    supported here: then it logs one warning line and leaves the model as it is)."""
    ok, reason = fp8_supported(device)
    if not ok:
        # the trainer autocasts to bf16 on CUDA only: a CPU run stays fp32
        what = "training in bf16" if torch.device(device).type == "cuda" else \
            "this run trains in fp32 as every CPU run does, where a GPU without fp8 would be training in bf16"
        log(f"Warning: --fp8 requires a CUDA GPU with compute capability >= 8.9 and torchao 0.17/0.18 ({reason}), {what}")
        return []
    if tokens is not None and recipe != "tensorwise":
        raise ValueError(f"choosing fp8 layers by timing models the tensorwise recipe, not {recipe!r}: pass tokens=None")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    chosen = None if tokens is None else choose_fp8_shapes(model, tokens, device, log, time_fn, cache=cache, names=names)
    config = Float8LinearConfig.from_recipe_name(recipe)
    converted, skipped = [], []

    def module_filter_fn(mod, fqn):
        keep = (fp8_module_filter(mod, fqn, skipped) and (names is None or fqn in names)
                and (chosen is None or chosen[(mod.out_features, mod.in_features)]))
        if keep:
            converted.append(fqn)
        return keep

    convert_to_float8_training(model, module_filter_fn=module_filter_fn, config=config)
    log(f"fp8: converted {len(converted)} Linear layers to float8 ({recipe} scaling)")
    if skipped:
        log(f"fp8: kept in bf16 (dims not multiples of 16): {', '.join(skipped)}")
    return converted


@contextmanager
def bf16_linears(model):
    """Inside this block torchao Float8Linear layers run as plain nn.Linear (bf16 under autocast).
    For eager sampling: a Float8 tensor rejects autocast's casts (aten.to.dtype) and fp8 GEMMs need
    token counts that are multiples of 16, while generation feeds one token at a time."""
    swapped = [m for m in model.modules() if type(m).__name__ == "Float8Linear"]
    for m in swapped:
        m.forward = types.MethodType(nn.Linear.forward, m)  # instance attribute shadows the class method
    try:
        yield len(swapped)
    finally:
        for m in swapped:
            del m.forward
