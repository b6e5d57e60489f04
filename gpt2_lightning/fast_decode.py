"""CPU decoding speed-ups, applied to generation's copy of a model and never to the model itself.

A one-token step multiplies a few rows by every weight matrix: it runs as fast as the weights
stream from memory (figures in docs/performance.md). decoder(model, dtype) gives the module the
steps run, a copy whose nn.Linear layers are stand-ins, or the model itself where none applies:
- SplitLinear, for fp32 on AMD CPUs with MKL (whose few-row products run on one core there; on
  Intel they use every core): one slice of the weight's rows per thread, multiplied as a batch.
- half-size weights (generate's dtype=): FP16Linear (fbgemm's fp16 kernel, x86), else NarrowLinear
  (weights converted to bf16 or fp16).
"""

from __future__ import annotations

import copy
import functools
import re
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# Measured on an EPYC: up to 64 rows split 1.2-1.9x faster, fading with more rows (1.1x at 256).
SPLIT_MAX_ROWS = 64
SPLIT_MIN_WEIGHTS = 2**16  # a smaller matrix sits in cache, and splitting costs more than it saves
# A matrix this many times wider than deep (the 50257-wide head) is multiplied the other way
# round, weight slices @ x.T: faster for the head, slower for the blocks' matrices.
SPLIT_WIDE = 16


def decoder(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """What runs model's steps with weights in dtype (None: model's own): model, or a kept copy
    in eval mode brought up to model's current weights."""
    weights_dtype = next(model.parameters()).dtype
    same = dtype in (None, weights_dtype)
    if same and not (splits_few_rows() and _on_cpu_in_fp32(model.parameters())):
        return model
    # Normal tensors, not inference tensors: the copy is refilled in place, in or out of the mode.
    with torch.inference_mode(False), torch.no_grad():
        return _copy_or_refill(model, weights_dtype if same else dtype)


@functools.cache
def splits_few_rows() -> bool:
    """Whether products of a few fp32 rows are split: where torch's BLAS is MKL and the CPU an AMD
    one (MKL's one-row products measured on one core there, on every core on Intel)."""
    return torch.backends.mkl.is_available() and cpu_vendor() == "AuthenticAMD"


def cpu_vendor() -> str:
    """The CPU's vendor as Linux names it ('GenuineIntel', 'AuthenticAMD'), or '' elsewhere."""
    try:
        found = re.search(r"^vendor_id\s*:\s*(\S+)", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        return ""
    return found.group(1) if found else ""


class _Kept(NamedTuple):
    """A decoding copy of a model, as _COPIES keeps it."""

    params: list[nn.Parameter]  # all the model's parameters when the copy was made
    layout: list[tuple[torch.Size, torch.device]]  # and their shapes and devices then
    refill: Callable[[], None]  # brings the copy's weights up to the model's current ones
    copy: nn.Module


# One copy per model and dtype: a caller alternating bf16 and fp16 steps rebuilds neither.
_COPIES: weakref.WeakKeyDictionary[nn.Module, dict[torch.dtype, _Kept]] = (
    weakref.WeakKeyDictionary()
)


def _copy_or_refill(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of model whose nn.Linear layers (lm_head included) are stand-ins reading their
    weights in dtype; every other parameter (norms, position embedding) is model's own, shared."""
    params = list(model.parameters())
    kept = _COPIES.get(model, {}).get(dtype)
    if kept is not None and _still_fits(kept, params):
        kept.refill()
        return kept.copy
    memo = {id(p): p for p in params}  # deepcopy takes these as they are: shared, not copied
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if dtype == params[0].dtype:  # fp32 on an AMD CPU: the model's own weights, split
        for linear in linears:
            if linear.weight.numel() >= SPLIT_MIN_WEIGHTS:
                memo[id(linear)] = SplitLinear(linear.weight, linear.bias)

        def refill() -> None:
            pass

    elif dtype == torch.float16 and _fbgemm_fp16(params):
        for linear in linears:  # deepcopy puts the stand-in wherever the Linear was
            memo[id(linear)] = FP16Linear(linear.weight, linear.bias)
        pairs = [(linear, memo[id(linear)]) for linear in linears]
        largest = max(linear.weight.numel() for linear in linears)
        scratch = torch.empty(largest, dtype=torch.float16)  # one fp16 matrix's worth, reused

        def refill() -> None:
            for linear, fp16 in pairs:
                fp16.refresh(linear.weight, linear.bias, scratch)

    else:
        # Converted into memory kept from the last call: ~25 ms at 124M, fresh pages ~0.1 s.
        for linear in linears:
            for p in linear.parameters():  # the embedding tied to lm_head is converted with it
                memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
            bias = None if linear.bias is None else memo[id(linear.bias)]
            memo[id(linear)] = NarrowLinear(memo[id(linear.weight)], bias)
        converted = [(p, memo[id(p)]) for p in params if memo[id(p)] is not p]

        def refill() -> None:
            for p, low_p in converted:
                low_p.copy_(p)

    low = copy.deepcopy(model, memo).eval()
    layout = [(p.shape, p.device) for p in params]
    # Copies of other dtypes made for the model's old parameters go; those still fitting stay.
    others = {d: k for d, k in _COPIES.get(model, {}).items() if _still_fits(k, params)}
    _COPIES[model] = {**others, dtype: _Kept(params, layout, refill, low)}
    return low


def _still_fits(kept: _Kept, params: list[nn.Parameter]) -> bool:
    """Whether a kept copy matches the model now: the same parameters, shapes and devices."""
    return (
        len(kept.params) == len(params)
        and all(a is b for a, b in zip(kept.params, params, strict=True))
        and kept.layout == [(p.shape, p.device) for p in params]
    )


def _on_cpu_in_fp32(params: Iterable[nn.Parameter]) -> bool:
    return all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)


def _fbgemm_fp16(params: list[nn.Parameter]) -> bool:
    """Whether fbgemm's fp16 products can run these weights: fp32 on the CPU, an x86 build of
    torch, and a CPU with AVX2 (fbgemm refuses older ones)."""
    return (
        "fbgemm" in torch.backends.quantized.supported_engines
        and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        and hasattr(torch.ops.quantized, "linear_dynamic_fp16")
        and _on_cpu_in_fp32(params)
    )


class _Product(nn.Module):
    """x @ weight.T + bias over the parameters given: what stands in for an nn.Linear."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.weight = weight
        self.bias = bias


class SplitLinear(_Product):
    """An nn.Linear's product, its weight's rows split into one slice per thread for a few fp32
    rows (a decoding step); more rows (a long prompt) take F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.get_num_threads()
        if (
            parts > 1
            and x.numel() <= SPLIT_MAX_ROWS * x.size(-1)
            and x.dtype == torch.float32  # not autocast's bf16
            and self.weight.size(0) >= parts  # a slice of rows per thread
        ):
            return split_linear(x, self.weight, self.bias, parts)
        return F.linear(x, self.weight, self.bias)


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


class NarrowLinear(_Product):
    """An nn.Linear's product over weights narrower than x (bf16 or fp16 for fp32 activations):
    multiplied in the weights' dtype, the result back in x's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class FP16Linear(nn.Module):
    """An nn.Linear's product with W rounded to fp16 and packed by fbgemm, whose kernel reads the
    half-size weights and multiplies in fp32 (x and the result stay fp32). torch's own fp16
    products (oneDNN) convert the weights too slowly to stream them: slower than fp32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.half = weight.detach().to(torch.float16)  # what is packed, to see what changes
        self.bias = None if bias is None else bias.detach().clone()
        self.packed = self._pack()

    def _pack(self) -> torch.ScriptObject:
        # fp16 values widen to fp32 exactly, so the packed weights are a function of self.half.
        return torch.ops.quantized.linear_prepack_fp16(self.half.float(), self.bias)

    def refresh(
        self, weight: torch.Tensor, bias: torch.Tensor | None, scratch: torch.Tensor
    ) -> None:
        """Pack again if weight or bias changed since (~2 s for all of 124M): compared, not trusted
        to a version count (fused AdamW updates weights in place without bumping theirs)."""
        half = scratch[: weight.numel()]
        half.view(weight.shape).copy_(weight)
        if _same_bits(half, self.half) and (bias is None or torch.equal(bias, self.bias)):
            return
        self.half.view(-1).copy_(half)
        if bias is not None:
            self.bias.copy_(bias)
        self.packed = self._pack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two fp16 tensors hold the same bits: compared as int64, several times faster than
    torch.equal on fp16 values, which runs on one core."""
    wide = torch.int64 if a.numel() % 4 == 0 else torch.int16
    return torch.equal(a.reshape(-1).view(wide), b.reshape(-1).view(wide))
