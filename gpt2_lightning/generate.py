"""Text generation: sampling controls, a KV cache, batches of prompts, and the command line.

One step loop (`_step_loop`) does the work: it runs the model, picks the next token of every row and
yields it. `stream` hands those tokens out as they come; `generate` collects them into a tensor.

    python -m gpt2_lightning.generate checkpoint=124M prompt="Hello, I'm a language model,"
"""

from __future__ import annotations

import codecs
import copy
import math
import numbers
import os
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import NamedTuple

import hydra
import torch
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from gpt2_lightning.cli import check_generate_command, one_line
from gpt2_lightning.model import GPT, KVCache
from gpt2_lightning.tokenizer import get_tokenizer
from gpt2_lightning.weights import WeightsError, load_weights


def check_sampling(
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> None:
    """Raise ValueError naming the first sampling argument that is out of range."""
    if not _is_integer(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: must be an integer >= 0")
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(
            f"temperature={temperature!r} is invalid: must be a number >= 0 (0 means greedy)"
        )
    if top_k is not None and (not _is_integer(top_k) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is invalid: must be an integer >= 1, or None")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} is invalid: must be in (0, 1], or None")


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy's too


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_prompt(
    model: GPT, idx: torch.Tensor, attention_mask: torch.Tensor | None, eos_id: int | None
) -> None:
    if idx.dim() != 2 or idx.numel() == 0 or idx.dtype not in (torch.long, torch.int32):
        raise ValueError(
            f"idx of shape {tuple(idx.shape)} and dtype {idx.dtype} is invalid: must be token "
            "ids (torch.long or torch.int32) of shape (batch, tokens), at least one of each"
        )
    if idx.min() < 0 or idx.max() >= model.cfg.vocab_size:
        raise ValueError(
            f"idx holds token id {int(idx.min() if idx.min() < 0 else idx.max())}: ids must be "
            f"in [0, {model.cfg.vocab_size}) (the model's vocab_size)"
        )
    if eos_id is not None and (not _is_integer(eos_id) or not 0 <= eos_id < model.cfg.vocab_size):
        raise ValueError(
            f"eos_id={eos_id!r} is invalid: must be an integer in [0, {model.cfg.vocab_size})"
        )
    if attention_mask is None:
        return
    if attention_mask.shape != idx.shape or attention_mask.is_floating_point():
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} and dtype "
            f"{attention_mask.dtype} is invalid: must be integers or bools shaped like idx, "
            f"{tuple(idx.shape)}"
        )
    mask = attention_mask.long()
    # Left padding: 0s then 1s in each row, so every row ends in a real token to continue from.
    if (
        ((mask != 0) & (mask != 1)).any()
        or (mask.diff(dim=1) < 0).any()
        or (mask[:, -1] == 0).any()
    ):
        raise ValueError(
            "attention_mask is invalid: must hold 0 (padding) then 1 (real tokens) in each row, "
            "with the padding on the left and at least one real token"
        )


def _sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The next token of each row (B,) from the last position's logits (B, vocab_size)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Less the row's maximum first: the same distribution, and no overflow to inf (then nan)
    # when a tiny temperature divides large logits.
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, -math.inf)
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the more likely ones already reach top_p; the most likely always stays.
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_logits = sorted_logits.masked_fill(outside, -math.inf)
        logits = logits.scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _steps(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
    use_cache: bool,
    generator: torch.Generator | None,
    attention_mask: torch.Tensor | None,
    dtype: torch.dtype | None,
) -> Iterator[torch.Tensor]:
    """Check the arguments now, then hand back the loop that yields the next token of every
    row (B,), one step at a time (a generator's body would only run at the first step)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    _check_prompt(model, idx, attention_mask, eos_id)
    # numpy's integers and floats pass the checks: from here on, Python's
    max_new_tokens, temperature = int(max_new_tokens), float(temperature)
    top_k = None if top_k is None else int(top_k)
    top_p = None if top_p is None else float(top_p)
    eos_id = None if eos_id is None else int(eos_id)
    if dtype is not None and dtype not in STEP_DTYPES:
        raise ValueError(
            f"dtype={dtype!r} is invalid: use torch.float16 or torch.bfloat16 for half-precision "
            "steps, torch.float32, or None for the model's own dtype"
        )
    weights_dtype = next(model.parameters()).dtype
    if dtype not in (None, weights_dtype) and not use_cache:
        raise ValueError(
            f"dtype={dtype!r} runs the KV cache's one-token steps in half precision, and "
            "use_cache=False has none: use use_cache=True, or dtype=None"
        )
    if dtype not in (None, weights_dtype) and dtype.itemsize >= weights_dtype.itemsize:
        # The steps convert the products' weights to a narrower dtype; the activations keep the
        # model's. fp16 weights with bf16 activations (or fp32 with bf16) would not multiply.
        raise ValueError(
            f"dtype={dtype!r} is invalid for a model whose weights are {weights_dtype}: "
            "half-precision steps need a wider (e.g. float32) model; use dtype=None, or call "
            "model.float() first"
        )

    @torch.inference_mode()  # on a generator function, torch enters the mode around each step only
    def step_loop() -> Iterator[torch.Tensor]:
        batch, prompt_length = idx.shape
        context = model.cfg.context_length
        cache = None
        stepper = model  # runs the one-token steps
        if use_cache and prompt_length <= context:
            max_length = min(context, prompt_length + max_new_tokens)
            cache = KVCache(model.cfg, batch, max_length, idx.device, weights_dtype)
            if dtype is not None and dtype != weights_dtype:
                # A one-token step multiplies one row by every weight matrix: it is bound by the
                # bytes of weights read, so half-size weights read half the bytes (fp16 through
                # fbgemm: 1.46x our fp32 at 124M batch 1 on a 2-core Xeon; see README). Only the
                # products' weights change: norms, attention and the KV cache stay in full
                # precision. The prompt does too: without native bf16 a bf16 matrix-matrix
                # product is far slower than fp32.
                stepper = _copy_in(model, dtype)
        sequence, mask = idx, attention_mask
        unseen = idx  # tokens not yet run through the model into the cache: the prompt, then one
        finished = torch.zeros(batch, dtype=torch.bool, device=idx.device)
        was_training = model.training
        model.eval()
        try:
            for _ in range(max_new_tokens):
                if cache is not None and sequence.size(1) <= context:
                    runner = model if unseen.size(1) > 1 else stepper
                    logits = runner(unseen, kv_cache=cache, attention_mask=mask, last_only=True)
                else:
                    # Positions are learned and absolute: once the window slides, every token sits
                    # at a new position and the cached keys/values are stale: recompute the window.
                    cache = None
                    window_mask = None if mask is None else mask[:, -context:]
                    logits = model(
                        sequence[:, -context:], attention_mask=window_mask, last_only=True
                    )
                token = _sample(logits[:, -1].float(), temperature, top_k, top_p, generator)
                if eos_id is not None:
                    token = token.masked_fill(finished, eos_id)  # finished rows are padded with EOS
                    finished |= token == eos_id
                yield token
                if (
                    eos_id is not None and finished.all()
                ):  # all() syncs a GPU: only when it can stop
                    return
                sequence = torch.cat([sequence, token[:, None]], dim=1)
                unseen = token[:, None]
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        finally:
            model.train(was_training)

    return step_loop()


# The dtypes generate(dtype=...) runs the one-token steps in (weights no wider than activations).
STEP_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _Kept(NamedTuple):
    """A low-precision copy of a model, as _copy_in keeps it."""

    params: list[nn.Parameter]  # all the model's parameters when the copy was made
    layout: list[tuple[torch.Size, torch.device]]  # and their shapes and devices then
    refill: Callable[[], None]  # brings the copy's weights up to the model's current ones
    copy: nn.Module


# One copy per model and dtype: a caller alternating bf16 and fp16 steps rebuilds neither.
_COPIES: weakref.WeakKeyDictionary[nn.Module, dict[torch.dtype, _Kept]] = (
    weakref.WeakKeyDictionary()
)


def _copy_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of model in eval mode whose matrix products (its Linear layers, lm_head included)
    read their weights in dtype. The other parameters (norms, embeddings) are shared with model,
    not copied, and keep the activations in its dtype.

    fp16 on a CPU with fbgemm: each Linear becomes an _FP16Linear (fbgemm's fp16 kernel).
    Otherwise the Linear layers' parameters are converted (and so the embedding tied to lm_head;
    deepcopy takes them from its memo, so tied weights stay tied) and model.Linear multiplies them
    in their dtype.

    The copy lives as long as the model and is brought up to its current weights at every call:
    converting into memory already mapped costs a fraction of fresh pages (~25 ms instead of
    ~0.1 s at 124M); fbgemm's packing costs ~2 s at 124M, so only layers whose fp16 weights
    changed are packed again."""
    # Normal tensors, not inference tensors: the copy is refilled in place, in or out of the mode.
    with torch.inference_mode(False), torch.no_grad():
        return _copy_or_refill(model, dtype)


def _copy_or_refill(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    params = list(model.parameters())
    kept = _COPIES.get(model, {}).get(dtype)
    if kept is not None and _still_fits(kept, params):
        kept.refill()
        return kept.copy.eval()
    memo = {id(p): p for p in params}
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if dtype == torch.float16 and _fbgemm_fp16(params):
        for linear in linears:  # deepcopy puts the stand-in wherever the Linear was
            memo[id(linear)] = _FP16Linear(linear.weight, linear.bias)
        pairs = [(linear, memo[id(linear)]) for linear in linears]
        largest = max(linear.weight.numel() for linear in linears)
        scratch = torch.empty(largest, dtype=torch.float16)  # one fp16 matrix's worth, reused

        def refill() -> None:
            for linear, fp16 in pairs:
                fp16.refresh(linear.weight, linear.bias, scratch)
    else:
        for linear in linears:
            for p in linear.parameters():
                memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
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
    """Whether a kept copy matches the model now: the same parameters, with the same shapes on
    the same devices."""
    return (
        len(kept.params) == len(params)
        and all(a is b for a, b in zip(kept.params, params, strict=True))
        and kept.layout == [(p.shape, p.device) for p in params]
    )


def _fbgemm_fp16(params: list[nn.Parameter]) -> bool:
    """Whether fbgemm's fp16 products can run these fp32 CPU weights (x86 builds of torch, on a
    CPU with AVX2: fbgemm refuses older ones)."""
    return (
        "fbgemm" in torch.backends.quantized.supported_engines
        and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        and hasattr(torch.ops.quantized, "linear_dynamic_fp16")
        and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    )


class _FP16Linear(nn.Module):
    """Stands in for a Linear in a decoding copy: x @ W.T + b with W rounded to fp16 and packed
    by fbgemm, whose kernel reads the half-size weights and multiplies in fp32 (x and the result
    stay fp32). torch's own fp16 products (oneDNN) convert the weights too slowly to stream them:
    on a 2-core Xeon the 124M products took 22.6 ms a step that way, 10.4-10.9 with fbgemm, 17.4
    in fp32."""

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
        """Pack again if weight or bias changed since: compared, not trusted to a version count
        (fused AdamW updates weights in place without bumping theirs)."""
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
    """Whether two fp16 tensors hold the same bits. torch.equal on fp16 values runs on one core
    (~40 ms for the 124M head); on the same bytes read as int64 it takes ~7 ms."""
    wide = torch.int64 if a.numel() % 4 == 0 else torch.int16
    return torch.equal(a.reshape(-1).view(wide), b.reshape(-1).view(wide))


def stream(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[int] | Iterator[torch.Tensor]:
    """Yield new token ids as they are made: an int for a batch of one, else a (B,) tensor."""
    steps = _steps(
        model,
        idx,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        eos_id,
        use_cache,
        generator,
        attention_mask,
        dtype,
    )
    if idx.size(0) == 1:
        return (int(token) for token in steps)
    return steps


def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The prompt ids idx (B, T) followed by up to max_new_tokens sampled ids: (B, T + new).

    dtype (torch.float16 or torch.bfloat16): run the one-token steps with the weights of the
    matrix products in that dtype, everything else (the prompt too) in the model's own; faster
    decoding on CPU (float16 most), at the price of ids that may differ.
    """
    steps = _steps(
        model,
        idx,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        eos_id,
        use_cache,
        generator,
        attention_mask,
        dtype,
    )
    return torch.cat([idx, *(token[:, None] for token in steps)], dim=1)


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None or name in ("float32", "fp32"):
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is invalid: use null (float32), bfloat16 or float16")
    return DTYPES[name]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device={name!r} is invalid: use auto, cpu or cuda[:index]") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r} is not supported: use auto, cpu or cuda[:index]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} is unavailable: this machine has no CUDA device")
    return device


def _run(cfg: DictConfig) -> None:
    # Cheap arguments first, so a typo fails at once rather than after loading the weights.
    check_sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    num_samples, seed = cfg.num_samples, cfg.seed
    if not _is_integer(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} is invalid: must be an integer >= 1")
    if seed is not None and (not _is_integer(seed) or not -(2**63) <= seed < 2**64):
        raise ValueError(
            f"seed={seed!r} is invalid: must be an integer in [-2**63, 2**64), or null for a "
            "random one"
        )
    if not isinstance(cfg.prompt, str):  # prompt=1e3 or prompt=null: Hydra read a number
        raise ValueError(
            f"prompt={cfg.prompt!r} is not text: quote it for Hydra, e.g. 'prompt=\"1e3\"'"
        )
    device = _device(str(cfg.device))
    dtype = _dtype(cfg.dtype)
    model = load_weights(str(cfg.checkpoint), key="checkpoint").to(device)

    tokenizer = get_tokenizer()
    # An empty prompt starts after <|endoftext|>, where GPT-2 saw every document begin.
    prompt_ids = tokenizer.encode(cfg.prompt, allowed_special="all") or [tokenizer.eot_token]
    if max(prompt_ids) >= model.cfg.vocab_size:
        raise ValueError(
            f"prompt={cfg.prompt!r} has token id {max(prompt_ids)}, outside this model's "
            f"vocabulary (vocab_size={model.cfg.vocab_size}): use a model with GPT-2's 50257 ids"
        )
    eos_id = tokenizer.eot_token if tokenizer.eot_token < model.cfg.vocab_size else None
    idx = torch.tensor([prompt_ids], device=device)
    generator = torch.Generator(device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()

    for sample in range(num_samples):
        if num_samples > 1:
            print(f"--- sample {sample + 1} of {num_samples} ---")
        print(cfg.prompt, end="", flush=True)
        # A character may span several tokens' bytes: the incremental decoder holds a partial
        # character back until its last byte arrives instead of printing a replacement mark.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tokens = stream(
            model,
            idx,
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.top_k,
            cfg.top_p,
            eos_id=eos_id,
            generator=generator,
            dtype=dtype,
        )
        for token in tokens:
            if token >= tokenizer.n_vocab:
                raise ValueError(
                    f"the model sampled id {token}, which the GPT-2 tokenizer's {tokenizer.n_vocab}"
                    f" ids lack (vocab_size={model.cfg.vocab_size}): use generate() from Python"
                )
            if token != eos_id:
                text = decoder.decode(tokenizer.decode_single_token_bytes(token))
                print(text, end="", flush=True)
        print(decoder.decode(b"", final=True))


@hydra.main(version_base=None, config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    """`python -m gpt2_lightning.generate checkpoint=... prompt=...`: stream text to stdout."""
    try:
        _run(cfg)
    except BrokenPipeError:  # `... | head`: the reader has all it wants; stop quietly
        # Python's recipe: point stdout at devnull, or its flush at exit fails once more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except (ValueError, OSError, WeightsError, OmegaConfBaseException) as error:
        # Expected mistakes get one line; an exception escaping here would print a traceback.
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    try:
        check_generate_command(sys.argv[1:])
    except ValueError as error:
        sys.exit(f"error: {error}")
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C while text streams: stop, without a traceback
        print(file=sys.stderr)
        sys.exit(130)
