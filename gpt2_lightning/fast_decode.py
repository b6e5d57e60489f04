"""CPU decoding speed-ups, applied to generation's copy of a model and never to the model itself.

A one-token step runs as fast as the weights stream from memory (docs/performance.md). decoder()
gives a copy whose nn.Linear layers are stand-ins, or the model itself where none applies:
SplitLinear (fp32 on AMD CPUs with MKL, whose few-row products use one core there), FP16Linear
(fbgemm's fp16 kernel, x86) or NarrowLinear (weights converted to bf16 or fp16).
"""

from __future__ import annotations

import copy
import functools
import re
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

SPLIT_MAX_ROWS = 64  # the split's gain fades with more rows (measured: see docs/performance.md)
SPLIT_MIN_WEIGHTS = 2**16  # a smaller matrix sits in cache, and splitting costs more than it saves
SPLIT_WIDE = 16  # this many times wider than deep (the head): weight slices @ x.T is faster


def decoder(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """What runs model's steps with weights in dtype: model, or a kept copy in eval mode."""
    weights_dtype = next(model.parameters()).dtype
    same = dtype in (None, weights_dtype)
    if same and not (splits_few_rows() and _on_cpu_in_fp32(model.parameters())):
        return model
    # Normal tensors, not inference tensors: the copy is refilled in place, in or out of the mode.
    with torch.inference_mode(False), torch.no_grad():
        return _copy_or_refill(model, weights_dtype if same else dtype)


@functools.cache
def splits_few_rows() -> bool:
    """Whether products of a few fp32 rows are split: where torch's BLAS is MKL on an AMD CPU."""
    return torch.backends.mkl.is_available() and cpu_vendor() == "AuthenticAMD"


def cpu_vendor() -> str:
    """The CPU's vendor as Linux names it ('GenuineIntel', 'AuthenticAMD'), or '' elsewhere."""
    try:
        found = re.search(r"^vendor_id\s*:\s*(\S+)", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        return ""
    return found.group(1) if found else ""


class _Kept(NamedTuple):
    params: list[nn.Parameter]  # kept alive, so that the ids in layout stay theirs
    layout: list[tuple[int, torch.Size, torch.device]]  # _layout(params) when the copy was made
    stand_ins: dict[nn.Linear, nn.Module]  # the model's layers and what stands in for them
    copy: nn.Module


# One copy per model and dtype: a caller alternating bf16 and fp16 steps rebuilds neither.
_COPIES: weakref.WeakKeyDictionary[nn.Module, dict[torch.dtype, _Kept]] = (
    weakref.WeakKeyDictionary()
)


def _copy_or_refill(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of model with stand-ins for its nn.Linear layers; other parameters are shared."""
    params = list(model.parameters())
    kept = _COPIES.get(model, {}).get(dtype)
    if kept is not None and kept.layout == _layout(params):
        # Refilled in place: memory kept from the last call is faster than fresh pages.
        for linear, stand_in in kept.stand_ins.items():
            stand_in.refill(linear)
        return kept.copy
    memo = {id(p): p for p in params}  # deepcopy takes these as they are: shared, not copied
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    stand_ins = {}
    if dtype == params[0].dtype:  # fp32 on an AMD CPU: the model's own weights, split
        for linear in linears:
            if linear.weight.numel() >= SPLIT_MIN_WEIGHTS:
                stand_ins[linear] = SplitLinear(linear.weight, linear.bias)
    elif dtype == torch.float16 and _fbgemm_fp16(params):
        largest = max(linear.weight.numel() for linear in linears)
        scratch = torch.empty(largest, dtype=torch.float16)  # one fp16 matrix's worth, shared
        for linear in linears:
            stand_ins[linear] = FP16Linear(linear.weight, linear.bias, scratch)
    else:
        for linear in linears:
            for p in linear.parameters():  # the embedding tied to lm_head is converted with it
                memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
            bias = None if linear.bias is None else memo[id(linear.bias)]
            stand_ins[linear] = NarrowLinear(memo[id(linear.weight)], bias)
    # deepcopy puts each stand-in wherever its Linear was
    memo.update((id(linear), stand_in) for linear, stand_in in stand_ins.items())
    low = copy.deepcopy(model, memo).eval()
    layout = _layout(params)
    # Copies of other dtypes made for the model's old parameters go; those still fitting stay.
    others = {d: k for d, k in _COPIES.get(model, {}).items() if k.layout == layout}
    _COPIES[model] = {**others, dtype: _Kept(params, layout, stand_ins, low)}
    return low


def _layout(params: list[nn.Parameter]) -> list[tuple[int, torch.Size, torch.device]]:
    """Which parameters a copy was made for, and their shapes and devices then."""
    return [(id(p), p.shape, p.device) for p in params]


def _on_cpu_in_fp32(params: Iterable[nn.Parameter]) -> bool:
    return all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)


def _fbgemm_fp16(params: list[nn.Parameter]) -> bool:
    """Whether fbgemm's fp16 products can run these weights (fp32, x86 torch, AVX2 CPU)."""
    return (
        "fbgemm" in torch.backends.quantized.supported_engines
        and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        and hasattr(torch.ops.quantized, "linear_dynamic_fp16")
        and _on_cpu_in_fp32(params)
    )


class _Product(nn.Module):
    """x @ weight.T + bias over the parameters given."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.weight = weight
        self.bias = bias

    def refill(self, linear: nn.Linear) -> None:
        """Bring the weights up to linear's: nothing to do where they are linear's own."""


class SplitLinear(_Product):
    """The weight's rows split into one slice per thread for a few fp32 rows, else F.linear."""

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
    """Multiplied in the weights' narrower dtype (bf16 or fp16), the result back in x's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)

    def refill(self, linear: nn.Linear) -> None:
        self.weight.copy_(linear.weight)
        if self.bias is not None:
            self.bias.copy_(linear.bias)


class FP16Linear(nn.Module):
    """Weights rounded to fp16 and packed by fbgemm, multiplied in fp32 (oneDNN's fp16 products
    convert the weights too slowly: slower than fp32)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scratch: torch.Tensor):
        super().__init__()
        self.half = weight.detach().to(torch.float16)  # what is packed, to see what changes
        self.bias = None if bias is None else bias.detach().clone()
        self.scratch = scratch  # at least weight.numel() fp16 values, shared between layers
        self.packed = self._pack()

    def _pack(self) -> torch.ScriptObject:
        # fp16 values widen to fp32 exactly, so the packed weights are a function of self.half.
        return torch.ops.quantized.linear_prepack_fp16(self.half.float(), self.bias)

    def refill(self, linear: nn.Linear) -> None:
        """Pack again if linear's weights changed: compared, as fused AdamW bumps no version."""
        weight, bias = linear.weight, linear.bias
        half = self.scratch[: weight.numel()]
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
    """Whether two fp16 tensors hold the same bits (as int64: torch.equal of fp16 uses one core)."""
    wide = torch.int64 if a.numel() % 4 == 0 else torch.int16
    return torch.equal(a.reshape(-1).view(wide), b.reshape(-1).view(wide))
