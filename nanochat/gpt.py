"""
The GPT model, nanochat's architecture:
- token embedding, rotary position embeddings (no learned positions), QK-norm
- parameter-free RMSNorm before attention, before the MLP and before lm_head
- causal attention through F.scaled_dot_product_attention, optional grouped-query heads
- MLP c_fc (d -> 4d) -> relu² -> c_proj (4d -> d), under a module named `mlp`
- no biases, untied lm_head, fp32 logits with a tanh soft-cap, zero-init output projections
- the loss never materializes the whole batch's logits (nanochat/loss.py: chunked linear + cross-entropy)
"""

import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.loss import linear_softcap_cross_entropy

SOFTCAP = 15.0  # logits = SOFTCAP * tanh(logits / SOFTCAP)


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768

    def to_dict(self):
        return asdict(self)


def config_from_depth(depth, vocab_size, sequence_len, aspect_ratio=64, head_dim=128):
    """nanochat's sizing rule: model_dim = depth * aspect_ratio, rounded up to a multiple of head_dim."""
    model_dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = model_dim // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_head, n_embd=model_dim)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x, cos, sin):
    # x: (B, T, H, D); rotate the two halves of the head dimension
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class KVCache:
    """Keys and values of every layer for incremental decoding (sampling only, batch of any size)."""

    def __init__(self, n_layer):
        self.keys = [None] * n_layer
        self.values = [None] * n_layer
        self.pos = 0  # number of positions already cached (rotary offset)

    def append(self, layer_idx, k, v):
        if self.keys[layer_idx] is not None:
            k = torch.cat([self.keys[layer_idx], k], dim=2)
            v = torch.cat([self.values[layer_idx], v], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_idx, k, v)
        # A prefill (or training) is causal; a single new token attends to everything cached.
        is_causal = q.size(2) == k.size(2)
        if not is_causal and q.size(2) != 1:
            raise ValueError("KV cache decoding takes the whole prompt first, then one token at a time")
        y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                           enable_gqa=self.n_head != self.n_kv_head)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables cover 10x the training length so sampling can run past it.
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._rotary_tables(self.rotary_seq_len, config.n_embd // config.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def _rotary_tables(seq_len, head_dim, base=10000):
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self):
        """nanochat's init: unit-std embeddings, small lm_head, uniform inputs, zero output projections."""
        n_embd = self.config.n_embd
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        bound = math.sqrt(3) / math.sqrt(n_embd)  # uniform with std 1/sqrt(n_embd)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                torch.nn.init.uniform_(lin.weight, -bound, bound)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
        # rotary tables are derived, recompute them on whatever device the model lives on
        cos, sin = self._rotary_tables(self.rotary_seq_len, n_embd // self.config.n_head)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """FLOPs per token for training: 6 x matmul params (all but the embedding) + the attention term.
        Call on the plain model, before any layer is swapped for a sparse or fp8 one: MFU is always
        counted against the dense model's FLOPs."""
        c = self.config
        nparams_matmul = self.num_params() - self.transformer.wte.weight.numel()
        head_dim = c.n_embd // c.n_head
        attn_flops = 12 * c.n_layer * c.n_head * head_dim * c.sequence_len
        return 6 * nparams_matmul + attn_flops

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        B, T = idx.shape
        T0 = 0 if kv_cache is None else kv_cache.pos
        if T0 + T > self.rotary_seq_len:
            raise ValueError(f"sequence of {T0 + T} tokens is longer than the rotary table ({self.rotary_seq_len})")
        cos, sin = self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache)
        x = norm(x)
        if kv_cache is not None:
            kv_cache.pos += T
        if targets is None:
            logits = self.lm_head(x).float()
            return SOFTCAP * torch.tanh(logits / SOFTCAP)
        # The loss walks the tokens in chunks: the fp32 logits of the whole batch never exist at once.
        return linear_softcap_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1), SOFTCAP,
                                            ignore_index=-1, reduction=loss_reduction)

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Yield up to max_tokens new token ids after the prompt `tokens` (a list of ints), with a KV cache."""
        device = self.transformer.wte.weight.device
        rng = torch.Generator(device=device).manual_seed(seed)
        kv_cache = KVCache(self.config.n_layer)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids, kv_cache=kv_cache)[:, -1, :]
            if temperature == 0.0:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            ids = next_id
            yield next_id.item()
