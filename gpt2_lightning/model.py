"""GPT-2 from scratch: one file, read top to bottom in the order the data flows.

token ids -> token + position embeddings -> num_layers x Block -> final norm -> lm_head -> logits

Each Block is pre-norm: x + Attention(Norm(x)), then x + FeedForward(Norm(x)).
This module imports only torch, so it can be copied out and used on its own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

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
        """The one place a config is checked (again by GPT: a field may have been set since)."""
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
    """(x - mean(x)) / sqrt(var(x) + eps) * weight + bias, var without Bessel's correction: one
    F.layer_norm pass instead of seven torch ops (measured: see docs/performance.md)."""

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


class KVCache:
    """Keys and values of the positions seen so far, for every layer, allocated once per run: a
    step writes its new ones at [length, length + T) instead of recomputing the whole prefix."""

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
        # narrow() rather than [:, :, a:b]: the same views without parsing an index tuple
        keys, values = self.keys[layer], self.values[layer]  # (B, H, max_length, head_dim)
        T = k.size(2)
        keys.narrow(2, self.length, T).copy_(k)
        values.narrow(2, self.length, T).copy_(v)
        return keys.narrow(2, 0, self.length + T), values.narrow(2, 0, self.length + T)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention, all heads in one matrix product (attention.py spells it
    out): scaled_dot_product_attention picks a fused kernel where the device has one."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer  # which slice of a KVCache is ours
        self.num_heads = cfg.num_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.out_proj.residual = True  # marks a residual projection for the scaled init in GPT

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        # (B, T, C) -> (B, num_heads, T, head_dim): each head attends independently
        q, k, v = (t.view(B, T, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # (B, H, past + T, head_dim)
        # mask=None means plain causal; a single new query may see every cached key.
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal=mask is None and T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads
        return self.out_proj(y)


class FeedForward(nn.Module):
    """Position-wise MLP: expand 4x, GELU (tanh approximation, as GPT-2), project back."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
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
    """GPT-2: token ids (B, T) -> logits (B, T, vocab_size); weights.py adds from_pretrained etc."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.num_layers))
        self.final_norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
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
        """Logits (B, T, vocab_size) for token ids idx (B, T), continuing from kv_cache if given.

        attention_mask (B, past + T) is 1 for real tokens, 0 for left padding: positions count
        real tokens only. last_only skips the 50257-wide head for all but the last position.
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
        return sum(p.numel() for p in self.parameters())
