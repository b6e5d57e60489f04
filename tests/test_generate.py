"""generate() / stream(): sampling controls, KV cache, batches, EOS, half-precision steps."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from gpt2_lightning import GPT, GPTConfig, KVCache
from gpt2_lightning.generate import generate, stream

CONTEXT = 32
PROMPTS = torch.tensor([[5, 17, 42, 8, 61], [70, 3, 3, 29, 11]])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=96, context_length=CONTEXT, emb_dim=32, num_layers=2, num_heads=2)
    model = GPT(cfg).eval()
    # Larger weights than GPT-2's init: a fresh model greedily repeats one token forever, which
    # would make "with cache == without cache" true for the wrong reason.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.5)
    return model


class FixedLogits(nn.Module):
    """Stands in for GPT: the same next-token distribution at every position."""

    def __init__(self, probs: list[float]):
        super().__init__()
        self.cfg = GPTConfig(
            vocab_size=len(probs), context_length=16, emb_dim=4, num_layers=1, num_heads=1
        )
        self.logits = nn.Parameter(torch.tensor(probs).log())

    def forward(
        self,
        idx: torch.Tensor,
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        if kv_cache is not None:
            kv_cache.length += idx.size(1)
        return self.logits.expand(*idx.shape, -1)


class Counter(FixedLogits):
    """Stands in for GPT: the next token is always the last one plus 1 (mod vocab_size)."""

    def forward(
        self,
        idx: torch.Tensor,
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        super().forward(idx, kv_cache)
        return 10.0 * nn.functional.one_hot((idx + 1) % self.cfg.vocab_size, self.cfg.vocab_size)


PROBS = [0.35, 0.25, 0.2, 0.1, 0.06, 0.04]


def draw(top_k: int | None = None, top_p: float | None = None, n: int = 4000) -> torch.Tensor:
    """n independent samples (one new token for each of n one-token prompts) from PROBS."""
    stub = FixedLogits(PROBS)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.zeros(n, 1, dtype=torch.long)
    return generate(stub, prompts, 1, top_k=top_k, top_p=top_p, generator=generator)[:, 1]


def test_greedy_with_cache_equals_without_past_context_length(model: GPT) -> None:
    cached = generate(model, PROMPTS, 100, temperature=0)
    recomputed = generate(model, PROMPTS, 100, temperature=0, use_cache=False)
    assert cached.shape == (2, 105)  # 105 > CONTEXT: the last 73 steps slide the window
    assert torch.equal(cached[:, :5], PROMPTS)
    assert torch.equal(cached, recomputed)
    assert len(set(cached[0, CONTEXT:].tolist())) > 10  # varied text, not one repeated token


def test_top_k_1_equals_greedy(model: GPT) -> None:
    greedy = generate(model, PROMPTS, 40, temperature=0)
    generator = torch.Generator().manual_seed(1)
    top1 = generate(model, PROMPTS, 40, temperature=1.5, top_k=1, generator=generator)
    assert torch.equal(top1, greedy)


def test_top_p_samples_only_inside_the_nucleus() -> None:
    tokens = draw(top_p=0.5)  # 0.35 < 0.5 <= 0.35 + 0.25: the nucleus is tokens {0, 1}
    assert set(tokens.tolist()) == {0, 1}
    assert (tokens == 0).float().mean().item() == pytest.approx(0.35 / 0.6, abs=0.04)


def test_top_k_samples_only_the_k_best() -> None:
    tokens = draw(top_k=3)
    assert set(tokens.tolist()) == {0, 1, 2}
    assert (tokens == 2).float().mean().item() == pytest.approx(0.2 / 0.8, abs=0.04)


def test_plain_sampling_follows_the_distribution() -> None:
    tokens = draw(top_p=1.0)
    frequencies = torch.bincount(tokens, minlength=len(PROBS)).float() / len(tokens)
    assert torch.allclose(frequencies, torch.tensor(PROBS), atol=0.03)


def test_same_seed_same_ids_other_seed_other_ids(model: GPT) -> None:
    def sample(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return generate(model, PROMPTS, 20, temperature=1.0, top_p=0.95, generator=generator)

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


def test_eos_stops_each_row_and_pads_it() -> None:
    counter = Counter([1.0] * 8)
    out = generate(counter, torch.tensor([[1], [4]]), 20, temperature=0, eos_id=6)
    # Row 1 reaches EOS after 2 tokens and is padded; row 0 after 5, which ends the run.
    assert out.tolist() == [[1, 2, 3, 4, 5, 6], [4, 5, 6, 6, 6, 6]]
    assert list(stream(counter, torch.tensor([[4]]), 20, temperature=0, eos_id=6)) == [5, 6]


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_gives_each_prompt_its_own_ids(model: GPT, use_cache: bool) -> None:
    prompts = [[3, 4, 5], [1, 2, 3, 4, 5, 6, 7], [90, 8, 7, 6, 5]]
    width = max(map(len, prompts))
    padded = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    # 40 new tokens: past context_length for every row, so the sliding window is masked too
    batch = generate(model, padded, 40, temperature=0, use_cache=use_cache, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = generate(model, torch.tensor([prompt]), 40, temperature=0, use_cache=use_cache)
        assert batch[row, width:].tolist() == alone[0, len(prompt) :].tolist()


def test_stream_yields_what_generate_returns(model: GPT) -> None:
    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(3)

    expected = generate(model, PROMPTS, 40, top_k=20, generator=seeded())
    one = list(stream(model, PROMPTS[:1], 40, top_k=20, generator=seeded()))
    assert all(isinstance(token, int) for token in one)
    assert one == generate(model, PROMPTS[:1], 40, top_k=20, generator=seeded())[0, 5:].tolist()
    rows = list(stream(model, PROMPTS, 40, top_k=20, generator=seeded()))
    assert torch.equal(torch.stack(rows, dim=1), expected[:, 5:])


def test_generate_restores_training_mode_and_keeps_the_prompt(model: GPT) -> None:
    model.train()
    try:
        out = generate(model, PROMPTS, 0)
        assert model.training
        assert torch.equal(out, PROMPTS)
        generate(model, PROMPTS, 3)
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(temperature=-0.5), "temperature=-0.5"),
        (dict(top_k=0), "top_k=0"),
        (dict(max_new_tokens=-1), "max_new_tokens=-1"),
    ],
)
def test_invalid_arguments_raise_naming_the_value(model: GPT, arguments: dict, named: str) -> None:
    arguments = {"max_new_tokens": 5, **arguments}
    with pytest.raises(ValueError, match=re.escape(named)):
        generate(model, PROMPTS, **arguments)
    with pytest.raises(ValueError, match=re.escape(named)):
        stream(model, PROMPTS, **arguments)  # at the call, not at the first token


def test_top_p_error_says_what_is_valid(model: GPT) -> None:
    with pytest.raises(ValueError, match=re.escape("top_p=1.5 is invalid: must be in (0, 1]")):
        generate(model, PROMPTS, 5, top_p=1.5)


def test_greedy_temperature_is_exactly_argmax() -> None:
    stub = FixedLogits(PROBS)
    out = generate(stub, torch.zeros(3, 2, dtype=torch.long), 4, temperature=0)
    assert out[:, 2:].tolist() == [[0] * 4] * 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decode_gives_valid_ids_and_float32_stays_the_default(dtype):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", num_layers=2)).eval()
    idx = torch.randint(0, 50257, (2, 5))
    low = generate(model, idx, 12, temperature=0, dtype=dtype)
    assert low.shape == (2, 17) and low.dtype == torch.long
    assert torch.equal(low[:, :5], idx)
    assert ((low >= 0) & (low < 50257)).all()
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left as it was

    default = generate(model, idx, 12, temperature=0)
    assert torch.equal(default, generate(model, idx, 12, temperature=0, dtype=torch.float32))
    assert torch.equal(default, generate(model, idx, 12, temperature=0, use_cache=False))
    # The prompt runs in float32 in both, so the first new token is the same.
    assert torch.equal(low[:, 5], default[:, 5])


def test_half_precision_steps_do_not_use_dropout():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", num_layers=2, dropout=0.5))  # left in training mode
    idx = torch.randint(0, 50257, (1, 4))
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)  # dropout would draw different masks
        runs.append(generate(model, idx, 8, temperature=0, dtype=torch.bfloat16))
    assert torch.equal(runs[0], runs[1])
    assert model.training  # and the caller's model is back in its mode


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, "bfloat16"])
def test_generate_rejects_a_dtype_it_cannot_step_in(dtype):
    model = GPT(GPTConfig.from_name("tiny", num_layers=1))
    with pytest.raises(
        ValueError, match=r"dtype=.* is invalid: use torch.float16 or torch.bfloat16"
    ):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 3, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_half_steps_of_a_model_already_in_bf16_are_refused_in_one_line(dtype):
    model = GPT(GPTConfig.from_name("tiny", num_layers=1)).to(torch.bfloat16)
    idx = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"invalid for a model whose weights are torch.bfloat16"):
        generate(model, idx, 3, dtype=dtype)
    for fine in (None, torch.bfloat16):  # its own dtype: the model steps as it is
        assert generate(model, idx, 3, temperature=0, dtype=fine).shape == (1, 5)


def test_a_tiny_temperature_is_greedy_not_nan(model):
    idx = torch.tensor([[1, 2, 3]])
    greedy = generate(model, idx, 6, temperature=0)
    # logits / 1e-40 overflowed to inf, then nan probabilities, before the row's max was taken off
    assert torch.equal(generate(model, idx, 6, temperature=1e-40), greedy)


@pytest.mark.parametrize(
    ("idx", "kwargs", "message"),
    [
        (torch.tensor([[1, 96]]), {}, r"idx holds token id 96: ids must be in \[0, 96\)"),
        (torch.tensor([[1, -1]]), {}, r"idx holds token id -1"),
        (torch.tensor([[1, 2]], dtype=torch.int16), {}, r"dtype torch.int16 is invalid"),
        (torch.zeros(0, 3, dtype=torch.long), {}, r"idx of shape \(0, 3\)"),
        (torch.tensor([[1, 2]]), {"eos_id": 1.5}, r"eos_id=1.5 is invalid"),
        (torch.tensor([[1, 2]]), {"eos_id": True}, r"eos_id=True is invalid"),
        (
            torch.tensor([[1, 2]]),
            {"attention_mask": torch.tensor([[0.5, 1.0]])},
            r"attention_mask of shape \(1, 2\) and dtype torch.float32 is invalid",
        ),
    ],
)
def test_bad_prompt_tensors_are_refused_before_any_step(model, idx, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, idx, 2, **kwargs)


def test_numpy_numbers_are_accepted_and_a_tensor_eos_id_is_named():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, context_length=16, emb_dim=16, num_layers=1, num_heads=2))
    idx = torch.randint(0, 97, (2, 3))
    plain = generate(model, idx, 4, temperature=0, top_k=5, eos_id=3)
    numpy_args = dict(temperature=np.float32(0), top_k=np.int64(5), eos_id=np.int64(3))
    assert torch.equal(generate(model, idx, np.int64(4), **numpy_args), plain)
    with pytest.raises(ValueError, match=r"eos_id=tensor\(3\) is invalid: must be an integer in"):
        generate(model, idx, 4, eos_id=torch.tensor(3))


def test_half_precision_steps_need_the_cache():
    model = GPT(GPTConfig(vocab_size=97, context_length=16, emb_dim=16, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match=r"use_cache=False has none: use use_cache=True"):
        generate(
            model, torch.zeros(1, 2, dtype=torch.long), 2, dtype=torch.float16, use_cache=False
        )
