"""GPT-2 from scratch: one file, read top to bottom in the order the data flows.

token ids -> token + position embeddings -> num_layers x Block -> final norm -> lm_head -> logits

Each Block is pre-norm: x + Attention(Norm(x)), then x + FeedForward(Norm(x)).
This module imports only torch, so it can be copied out and used on its own.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# The four released GPT-2 sizes (OpenAI's hparams.json) plus a CPU-sized one for tests and demos.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(emb_dim=128, num_layers=4, num_heads=4, context_length=128),
    "124M": dict(emb_dim=768, num_layers=12, num_heads=12),
    "355M": dict(emb_dim=1024, num_layers=24, num_heads=16),
    "774M": dict(emb_dim=1280, num_layers=36, num_heads=20),
    "1558M": dict(emb_dim=1600, num_layers=48, num_heads=25),
}
ALIASES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}
NORMS = ("layernorm", "rmsnorm")


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    dropout: float = 0.0
    qkv_bias: bool = True
    norm: str = "layernorm"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The one place a config is checked (at creation, and again by GPT: a field may have
        been set since); everything below trusts it."""
        for name in ("vocab_size", "context_length", "emb_dim", "num_layers", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: must be a positive integer")
        if self.emb_dim % self.num_heads != 0:
            raise ValueError(
                f"emb_dim={self.emb_dim} is not divisible by num_heads={self.num_heads}: "
                "choose num_heads that divides emb_dim"
            )
        if not isinstance(self.qkv_bias, bool):
            raise ValueError(f"qkv_bias={self.qkv_bias!r} is invalid: must be True or False")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} is invalid: must be in [0, 1)")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r} is unknown: valid norms are {', '.join(NORMS)}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.num_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> GPTConfig:
        """The config of a named size ('tiny', '124M', ... or an alias such as 'gpt2-medium')."""
        size = ALIASES.get(name, name)
        if size not in SIZES:
            valid = ", ".join([*SIZES, *ALIASES])
            raise ValueError(f"unknown model size {name!r}: valid sizes are {valid}")
        return cls(**{**SIZES[size], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


class LayerNorm(nn.Module):
    """Normalise each vector to zero mean and unit variance, then scale and shift (learned):

        (x - mean(x)) / sqrt(var(x) + eps) * weight + bias     (var without Bessel's correction)

    F.layer_norm computes this in one pass over x; spelled out in torch ops it is seven
    passes and seven kernel calls, which cost a decoding step 6% at 124M and ~20% on small models.
    RMSNorm below is written out op by op.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.size(-1),), self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """Divide each vector by its root mean square, then scale: LayerNorm without mean or bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


def make_norm(cfg: GPTConfig) -> nn.Module:
    return LayerNorm(cfg.emb_dim) if cfg.norm == "layernorm" else RMSNorm(cfg.emb_dim)


class Linear(nn.Linear):
    """nn.Linear, with a faster path for the few rows of a decoding step on some CPUs.

    A decode step multiplies one row per sequence by every weight matrix, so its speed is how fast
    the weights stream from memory. For a few fp32 rows torch calls MKL's matrix-vector routine,
    which on AMD CPUs runs on one core and reads memory at one core's rate. There, cutting the
    weight's rows into one slice per thread and multiplying the slices as a batch (bmm runs batch
    entries in parallel) puts every core to work: ~1.5x faster decoding at 124M on 2 cores of an
    EPYC (~80% of the bandwidth a plain sum reaches). On Intel CPUs MKL already uses every core
    (a 2-core Xeon: the plain product streams as fast as a sum, the split one ~25% slower), so
    the plain path stays (see splits_few_rows).
    The same products up to float rounding; training (many rows) takes the plain path.

    Weights stored narrower than x (half-size weights for fp32 activations: generate's dtype=) are
    multiplied in their own dtype, and the result comes back in x's: the weights are what a
    decoding step reads.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.element_size() < x.element_size():  # not autocast's (bf16 x, fp32 weights)
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)
        parts = torch.get_num_threads()
        if (
            parts > 1
            and splits_few_rows()
            and x.numel() <= SPLIT_MAX_ROWS * x.size(-1)
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.numel() >= SPLIT_MIN_WEIGHTS
            and self.out_features >= parts  # a slice of rows per thread
        ):
            return split_linear(x, self.weight, self.bias, parts)
        return F.linear(x, self.weight, self.bias)


@functools.cache
def splits_few_rows() -> bool:
    """Whether Linear splits products of a few fp32 rows: where torch's BLAS is MKL and the CPU
    an AMD one (MKL's one-row products measured on one core there, on every core on Intel)."""
    return torch.backends.mkl.is_available() and cpu_vendor() == "AuthenticAMD"


def cpu_vendor() -> str:
    """The CPU's vendor as Linux names it ('GenuineIntel', 'AuthenticAMD'), or '' elsewhere."""
    try:
        found = re.search(r"^vendor_id\s*:\s*(\S+)", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        return ""
    return found.group(1) if found else ""


# On the EPYC, up to 64 rows, splitting measured 1.2-1.9x faster (a decode step of 8 sequences, a
# short prompt); the gain fades with more rows (1.1x at 256), and training takes the plain path.
SPLIT_MAX_ROWS = 64
SPLIT_MIN_WEIGHTS = 2**16  # a smaller matrix sits in cache, and splitting costs more than it saves
# A matrix this many times wider than deep (the 50257-wide head) is multiplied the other way round,
# weight slices @ x.T: measured ~1.2x faster decoding of the small shape (emb 128), ~1.1x at 124M
# batch 8, the same at batch 1; for the blocks' matrices that order measured slower.
SPLIT_WIDE = 16


def split_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, parts: int
) -> torch.Tensor:
    """F.linear(x, weight, bias), computed as `parts` products over slices of weight's rows."""
    out_features, in_features = weight.shape
    rows = out_features // parts
    whole = parts * rows  # the rows that divide evenly; the remainder (< parts) follows apart
    slices = weight[:whole].view(parts, rows, in_features)  # (parts, rows, in)
    flat = x.reshape(-1, in_features)  # (N, in)
    wide = out_features >= SPLIT_WIDE * in_features
    if wide:  # (parts, rows, in) @ (parts, in, N) -> (parts, rows, N)
        a, b, bias_shape = slices, flat.T.expand(parts, -1, -1), (parts, rows, 1)
    else:  # (parts, N, in) @ (parts, in, rows) -> (parts, N, rows)
        a, b, bias_shape = flat.expand(parts, -1, -1), slices.transpose(1, 2), (parts, 1, rows)
    # The bias is added inside the product, as addmm does for F.linear.
    y = torch.bmm(a, b) if bias is None else torch.baddbmm(bias[:whole].view(bias_shape), a, b)
    # (N, whole): the slices side by side
    y = y.reshape(whole, -1).T if wide else y.transpose(0, 1).reshape(-1, whole)
    if whole < out_features:
        rest = None if bias is None else bias[whole:]
        y = torch.cat([y, F.linear(flat, weight[whole:], rest)], dim=-1)
    return y.reshape(*x.shape[:-1], out_features)


class KVCache:
    """Keys and values of the positions seen so far, for every layer, allocated once per run.

    Generation feeds one new token at a time; without a cache every step would recompute the keys
    and values of the whole prefix. Each attention layer writes its new keys/values at
    positions [length, length + T) and reads back [0, length + T).
    """

    def __init__(
        self,
        cfg: GPTConfig,
        batch_size: int,
        max_length: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.max_length = max_length or cfg.context_length
        shape = (cfg.num_layers, batch_size, cfg.num_heads, self.max_length, cfg.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far; GPT.forward advances it after all layers

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # narrow(dim, start, length) rather than [layer, :, :, a:b]: the same views, but cheaper
        # to call than parsing an index tuple, and a decode step makes 4 per layer (measured 4-7%
        # faster steps where such overheads dominate: small models)
        keys, values = self.keys[layer], self.values[layer]  # (B, H, max_length, head_dim)
        T = k.size(2)
        keys.narrow(2, self.length, T).copy_(k)
        values.narrow(2, self.length, T).copy_(v)
        return keys.narrow(2, 0, self.length + T), values.narrow(2, 0, self.length + T)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention, all heads in one matrix product.

    attention.py has the same computation spelled out step by step; here the scores, mask, softmax
    and weighted sum are one call to scaled_dot_product_attention, which picks a fused kernel
    (flash or memory-efficient attention) where the device has one.
    """

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer  # which slice of a KVCache is ours
        self.num_heads = cfg.num_heads
        self.dropout = cfg.dropout
        self.qkv = Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.out_proj = Linear(cfg.emb_dim, cfg.emb_dim)
        self.out_proj.residual = True  # marks a residual projection for the scaled init in GPT

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        # (B, T, C) -> (B, num_heads, T, head_dim): each head attends independently
        q, k, v = (t.view(B, T, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # (B, H, past + T, head_dim)
        # mask=None means plain causal; a single new query may see every cached key.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads
        return self.out_proj(y)


class FeedForward(nn.Module):
    """Position-wise MLP: expand 4x, GELU (tanh approximation, as GPT-2), project back."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.proj = Linear(4 * cfg.emb_dim, cfg.emb_dim)
        self.proj.residual = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    """One transformer layer: pre-norm attention and feed-forward, each added to the residual."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = MultiHeadAttention(cfg, layer)
        self.norm2 = make_norm(cfg)
        self.ff = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), mask, kv_cache))
        x = x + self.dropout(self.ff(self.norm2(x)))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.num_layers))
        self.final_norm = make_norm(cfg)
        self.lm_head = Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        # Weight tying: the same matrix maps ids to vectors and vectors back to id scores. GPT-2
        # does this; it saves vocab_size x emb_dim parameters (38.6M of the 124M model).
        self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual", False):
                # Each layer adds two residual branches; scaling their init by 1/sqrt(2 * layers)
                # keeps the variance of the residual stream from growing with depth (GPT-2 paper).
                std /= math.sqrt(2 * self.cfg.num_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids idx (B, T).

        kv_cache: continue from the positions it holds, and store this call's keys/values in it.
        attention_mask: (B, past + T), 1 for real tokens and 0 for left padding; positions then
        count real tokens only, so a padded prompt gets the logits it would get alone.
        last_only: logits of the last position only, (B, 1, vocab_size). Generation needs no
        more, and the 50257-wide head is the largest matrix product of a prompt's forward pass.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx of shape {tuple(idx.shape)} is invalid: must be (batch, tokens)")
        B, T = idx.shape
        past = kv_cache.length if kv_cache is not None else 0
        limit = min(self.cfg.context_length, kv_cache.max_length if kv_cache else math.inf)
        if past + T > limit:
            raise ValueError(
                f"sequence length {past + T} exceeds context_length={self.cfg.context_length} "
                f"(or the KV cache's max_length): pass at most {limit} tokens"
            )
        mask = None  # plain causal attention: the fused kernels' fast path
        if attention_mask is not None:
            real = attention_mask.bool()
            pos = (real.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
            causal = torch.ones(T, past + T, dtype=torch.bool, device=idx.device).tril(past)
            own = causal & ~causal.tril(past - 1)  # the diagonal: each position's own key
            # A padding query sees only itself, so no row of the mask is empty (softmax of nothing).
            mask = (causal & real[:, None, None, :]) | own  # (B, 1, T, past + T)
        else:
            pos = torch.arange(past, past + T, device=idx.device)
            if past > 0 and T > 1:  # SDPA's is_causal aligns top-left; spell out the offset mask
                mask = torch.ones(T, past + T, dtype=torch.bool, device=idx.device).tril(past)
        x = self.dropout(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.final_norm(x))  # (B, T, vocab_size)

    def num_parameters(self) -> int:
        """Number of parameters; the tied embedding / lm_head matrix is counted once."""
        return sum(p.numel() for p in self.parameters())  # parameters() yields shared ones once

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> GPT:
        """Official OpenAI weights by size name ('124M', 'gpt2', ...) or a local HF folder."""
        from gpt2_lightning.weights import load_pretrained

        return load_pretrained(name_or_path)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write a Hugging Face-format folder (config.json + model.safetensors)."""
        from gpt2_lightning.weights import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> GPT:
        """The bare model from a Lightning checkpoint written by gpt2_lightning.train."""
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        model = cls(GPTConfig(**ckpt["hyper_parameters"]["model"]))
        prefix = "model."
        state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        model.load_state_dict(state)
        return model
