"""Text generation: the sampling loop over a GPT and its KV cache, one new token at a time.

`stream` yields the tokens as they are made, `generate` collects them; the CLI is generate_cli.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from gpt2_lightning import fast_decode
from gpt2_lightning.checks import check_integer, is_integer, is_number
from gpt2_lightning.model import GPT, KVCache

# What generate(dtype=...) may run the one-token steps' weights in.
STEP_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_sampling(
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> None:
    """Raise ValueError naming the first sampling argument that is out of range."""
    check_integer("max_new_tokens", max_new_tokens)
    if not is_number(temperature) or temperature < 0:
        raise ValueError(
            f"temperature={temperature!r} is invalid: must be a number >= 0 (0 means greedy)"
        )
    if top_k is not None and (not is_integer(top_k) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is invalid: must be an integer >= 1, or None")
    if top_p is not None and (not is_number(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} is invalid: must be in (0, 1], or None")


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
    if eos_id is not None and (not is_integer(eos_id) or not 0 <= eos_id < model.cfg.vocab_size):
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
    # Left padding, 0s then 1s: no value below 0, none lower than the one before, the last a 1.
    if (mask[:, 0] < 0).any() or (mask.diff(dim=1) < 0).any() or (mask[:, -1] != 1).any():
        raise ValueError(
            "attention_mask is invalid: each row must be 0s (left padding), then at least one 1"
        )


def _check_dtype(model: GPT, dtype: torch.dtype | None, use_cache: bool) -> None:
    weights_dtype = next(model.parameters()).dtype
    if dtype in (None, weights_dtype):
        return
    if dtype not in STEP_DTYPES:
        raise ValueError(
            f"dtype={dtype!r} is invalid: use torch.float16 or torch.bfloat16 for half-precision "
            "steps, torch.float32, or None for the model's own dtype"
        )
    if not use_cache:
        raise ValueError(
            f"dtype={dtype!r} runs the KV cache's one-token steps in half precision, and "
            "use_cache=False has none: use use_cache=True, or dtype=None"
        )
    if dtype.itemsize >= weights_dtype.itemsize:  # activations keep the weights' dtype
        raise ValueError(
            f"dtype={dtype!r} is invalid for a model whose weights are {weights_dtype}: "
            "half-precision steps need wider ones; use dtype=None, or model.float() first"
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
    # Less the row's maximum first: no overflow to inf (then nan) under a tiny temperature.
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
    """Check now (a generator's body would wait for the first step), then return the step loop."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    _check_prompt(model, idx, attention_mask, eos_id)
    _check_dtype(model, dtype, use_cache)
    # numpy's integers and floats pass the checks: from here on, Python's
    max_new_tokens, temperature = int(max_new_tokens), float(temperature)
    top_k = None if top_k is None else int(top_k)
    top_p = None if top_p is None else float(top_p)
    eos_id = None if eos_id is None else int(eos_id)

    @torch.inference_mode()  # on a generator function, torch enters the mode around each step only
    def step_loop() -> Iterator[torch.Tensor]:
        batch, prompt_length = idx.shape
        context = model.cfg.context_length
        # The prompt (and a slid window) runs in the model's own dtype: a half-precision
        # matrix-matrix product is far slower than fp32 without native support.
        runner = fast_decode.decoder(model)
        stepper, cache = runner, None  # stepper runs the one-token steps
        if use_cache and prompt_length <= context:
            max_length = min(context, prompt_length + max_new_tokens)
            weights_dtype = next(model.parameters()).dtype
            cache = KVCache(model.cfg, batch, max_length, idx.device, weights_dtype)
            stepper = fast_decode.decoder(model, dtype)
        sequence, mask = idx, attention_mask
        unseen = idx  # tokens not yet run through the model into the cache: the prompt, then one
        finished = torch.zeros(batch, dtype=torch.bool, device=idx.device)
        was_training = model.training
        model.eval()
        try:
            for _ in range(max_new_tokens):
                if cache is not None and sequence.size(1) <= context:
                    step = runner if unseen.size(1) > 1 else stepper
                    logits = step(unseen, kv_cache=cache, attention_mask=mask, last_only=True)
                else:
                    # Positions are learned and absolute: once the window slides, every token sits
                    # at a new position and the cached keys/values are stale: recompute the window.
                    cache = None
                    window_mask = None if mask is None else mask[:, -context:]
                    logits = runner(
                        sequence[:, -context:], attention_mask=window_mask, last_only=True
                    )
                token = _sample(logits[:, -1].float(), temperature, top_k, top_p, generator)
                if eos_id is not None:
                    token = token.masked_fill(finished, eos_id)  # finished rows are padded with EOS
                    finished |= token == eos_id
                yield token
                if eos_id is not None and finished.all():  # syncs a GPU: only with an eos_id
                    return
                sequence = torch.cat([sequence, token[:, None]], dim=1)
                unseen = token[:, None]
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        finally:
            model.train(was_training)

    return step_loop()


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
    steps = _steps(**locals())  # first in the body, locals() is the arguments
    return (int(token) for token in steps) if idx.size(0) == 1 else steps


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

    dtype (float16 or bfloat16) narrows the one-token steps' weights (docs/generation.md).
    """
    steps = _steps(**locals())  # first in the body, locals() is the arguments
    return torch.cat([idx, *(token[:, None] for token in steps)], dim=1)


if __name__ == "__main__":  # `python -m gpt2_lightning.generate ...`: the command line
    from gpt2_lightning.generate_cli import run

    run()
