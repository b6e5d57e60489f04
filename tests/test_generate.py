"""generate() / stream(): sampling controls, KV cache, batches, EOS, and the generate command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gpt2_lightning import GPT, GPTConfig, KVCache, get_tokenizer
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


# The command line, run for real in a subprocess.


def run_cli(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",  # the download fails at once, as on a machine without network
        "HF_HOME": str(cwd / "hf_home"),
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",  # as in one_thread above
    }
    command = [sys.executable, "-m", "gpt2_lightning.generate", *overrides]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8", timeout=120
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_rejects_bad_top_p_before_loading(tmp_path: Path) -> None:
    # checkpoint=124M is not in this offline cache: the error is about top_p, found first
    result = run_cli(tmp_path, "top_p=1.5")
    assert_one_line_error(result, "top_p=1.5", "(0, 1]")


def test_cli_rejects_unknown_checkpoint(tmp_path: Path) -> None:
    missing = tmp_path / "missing.ckpt"
    result = run_cli(tmp_path, f"checkpoint={missing}")
    assert_one_line_error(result, f"checkpoint='{missing}'", "124M")


def test_cli_explains_offline_download_failure(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "checkpoint=gpt2")
    assert_one_line_error(result, "openai-community/gpt2", "download gpt2", "local folder")


def save_lightning_checkpoint(model: GPT, path: Path) -> None:
    """The layout gpt2_lightning.train writes: hyperparameters plus the module's state dict."""
    state = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    torch.save({"hyper_parameters": {"model": model.cfg.to_dict()}, "state_dict": state}, path)


@pytest.mark.parametrize("source", ["lightning", "huggingface"])
def test_cli_streams_the_seeded_sample(tmp_path: Path, source: str) -> None:
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, num_layers=1, num_heads=2)
    )
    if source == "lightning":
        checkpoint = tmp_path / "tiny.ckpt"
        save_lightning_checkpoint(model, checkpoint)
    else:
        checkpoint = tmp_path / "tiny-hf"
        model.save_pretrained(checkpoint)
    before = set(tmp_path.iterdir())
    prompt = "Café au lait"  # multi-byte characters survive the round trip
    result = run_cli(
        tmp_path,
        f"checkpoint={checkpoint}",
        f"prompt='{prompt}'",
        "max_new_tokens=12",
        "seed=5",
        "top_k=40",
        "top_p=0.9",
    )
    assert result.returncode == 0, result.stderr
    tokenizer = get_tokenizer()
    generator = torch.Generator().manual_seed(5)
    idx = torch.tensor([tokenizer.encode(prompt)])
    new = generate(model, idx, 12, top_k=40, top_p=0.9, eos_id=50256, generator=generator)
    new_ids = [token for token in new[0, idx.size(1) :].tolist() if token != 50256]
    assert result.stdout == prompt + tokenizer.decode(new_ids) + "\n"
    assert len(result.stdout) > len(prompt) + 1
    # no outputs/ run folder, no .hydra/, no log file
    assert set(tmp_path.iterdir()) - {tmp_path / "hf_home"} == before


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


def test_generate_cli_rejects_an_unknown_dtype(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gpt2_lightning.generate", "checkpoint=124M", "dtype=int8"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "dtype='int8' is invalid" in result.stderr and "bfloat16" in result.stderr
    assert "Traceback" not in result.stderr


def test_low_precision_copy_converts_the_products_weights_once_and_keeps_the_tie():
    from gpt2_lightning.generate import _copy_in

    model = GPT(GPTConfig.from_name("tiny", num_layers=1, dropout=0.5))  # in training mode
    low = _copy_in(model, torch.bfloat16)
    assert not low.training  # no dropout in the steps, whatever mode the model is in
    assert low.lm_head.weight is low.tok_emb.weight  # still tied: one matrix, not two
    assert low.tok_emb.weight.dtype == low.blocks[0].ff.fc.bias.dtype == torch.bfloat16
    assert torch.equal(low.blocks[0].ff.fc.weight, model.blocks[0].ff.fc.weight.bfloat16())
    # Norms and the position embedding are the model's own, shared, not copied.
    assert low.final_norm.weight is model.final_norm.weight
    assert low.pos_emb.weight is model.pos_emb.weight
    assert sum(p.numel() for p in low.parameters()) == model.num_parameters()
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_low_precision_copy_is_kept_and_follows_the_models_weights():
    from gpt2_lightning.generate import _COPIES, _copy_in

    model = GPT(GPTConfig.from_name("tiny", num_layers=1))
    low = _copy_in(model, torch.bfloat16)
    with torch.no_grad():
        model.blocks[0].ff.fc.weight.add_(1.0)  # e.g. a training step between two generate calls
    again = _copy_in(model, torch.bfloat16)
    assert again is low  # the same memory, refilled
    assert torch.equal(again.blocks[0].ff.fc.weight, model.blocks[0].ff.fc.weight.bfloat16())
    half = _copy_in(model, torch.float16)  # another dtype gets a copy of its own
    assert _copy_in(model, torch.bfloat16) is low and _copy_in(model, torch.float16) is half
    model.blocks[0].ff.fc.weight = torch.nn.Parameter(torch.zeros(512, 128))  # a new parameter
    fresh = _copy_in(model, torch.bfloat16)
    assert fresh is not low
    assert torch.float16 not in _COPIES[model]  # the fp16 copy of the old parameter went with it
    assert torch.equal(fresh.blocks[0].ff.fc.weight, torch.zeros(512, 128, dtype=torch.bfloat16))
    model.final_norm.weight = torch.nn.Parameter(torch.full((128,), 2.0))  # shared, not converted
    assert _copy_in(model, torch.bfloat16).final_norm.weight is model.final_norm.weight


@pytest.mark.parametrize("missing", ["fbgemm", "avx2"])
def test_fp16_copy_converts_the_weights_where_fbgemm_is_missing(monkeypatch, missing):
    generate_module = sys.modules["gpt2_lightning.generate"]
    if missing == "fbgemm":  # e.g. an Arm build of torch
        monkeypatch.setattr(generate_module, "_fbgemm_fp16", lambda params: False)
    else:  # an x86 CPU older than AVX2, which fbgemm refuses
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    model = GPT(GPTConfig.from_name("tiny", num_layers=1))
    low = generate_module._copy_in(model, torch.float16)
    assert low.lm_head.weight is low.tok_emb.weight
    assert low.tok_emb.weight.dtype == low.blocks[0].ff.fc.bias.dtype == torch.float16
    assert torch.equal(low.blocks[0].ff.fc.weight, model.blocks[0].ff.fc.weight.half())


needs_fbgemm = pytest.mark.skipif(
    "fbgemm" not in torch.backends.quantized.supported_engines,
    reason="fbgemm's fp16 products exist on x86 builds of torch only",
)


@needs_fbgemm
def test_fp16_copy_multiplies_the_rounded_weights_in_fp32_with_fbgemm():
    from gpt2_lightning.generate import _copy_in, _FP16Linear

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", num_layers=1))
    low = _copy_in(model, torch.float16)
    assert isinstance(low.lm_head, _FP16Linear) and isinstance(low.blocks[0].attn.qkv, _FP16Linear)
    # Embeddings and norms are the model's own fp32 parameters, shared, not copied.
    assert low.tok_emb.weight is model.tok_emb.weight
    assert low.final_norm.weight is model.final_norm.weight
    x = torch.randn(3, 1, 128)
    pairs = [(low.lm_head, model.lm_head), (low.blocks[0].ff.fc, model.blocks[0].ff.fc)]
    for ours, theirs in pairs:
        rounded = theirs.weight.half().float()
        expected = torch.nn.functional.linear(x, rounded, theirs.bias)
        y = ours(x)
        assert y.dtype == torch.float32 and y.shape == expected.shape
        assert (y - expected).abs().max() < 1e-5  # fp32 products of the fp16-rounded weights
        assert (y - theirs(x)).abs().max() > 1e-5  # ... which are not the fp32 weights


@needs_fbgemm
def test_fp16_copy_packs_again_only_what_changed_even_unseen_by_version_counters():
    from gpt2_lightning.generate import _copy_in

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", num_layers=2))
    low = _copy_in(model, torch.float16)
    packed = {name: m.packed for name, m in low.named_modules() if hasattr(m, "packed")}
    fc = model.blocks[1].ff.fc
    fc.weight.data.mul_(-1.0)  # through .data: the parameter's version counter does not move
    fc.bias.data.add_(1.0)
    assert _copy_in(model, torch.float16) is low
    repacked = {name for name, m in low.named_modules() if hasattr(m, "packed")}
    repacked = {name for name in repacked if low.get_submodule(name).packed is not packed[name]}
    assert repacked == {"blocks.1.ff.fc"}
    x = torch.randn(2, 1, 128)
    expected = torch.nn.functional.linear(x, fc.weight.half().float(), fc.bias)
    assert (low.blocks[1].ff.fc(x) - expected).abs().max() < 1e-5
    # Decoding follows the new weights: the same ids as a fresh copy of the changed model.
    idx = torch.randint(0, 50257, (1, 4))
    fresh = GPT(model.cfg)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(
        generate(model, idx, 6, temperature=0, dtype=torch.float16),
        generate(fresh, idx, 6, temperature=0, dtype=torch.float16),
    )


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_copy_goes_with_its_model(dtype):
    import gc

    from gpt2_lightning.generate import _COPIES, _copy_in

    model = GPT(GPTConfig.from_name("tiny", num_layers=1))
    _copy_in(model, dtype)
    assert model in _COPIES
    before = len(_COPIES)
    del model
    gc.collect()
    assert len(_COPIES) == before - 1  # the copy does not keep its model alive


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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("device=meta", "device='meta' is not supported: use auto, cpu or cuda[:index]"),
        ("seed=99999999999999999999", "seed=99999999999999999999 is invalid: must be an integer"),
        ("prompt=1e3", "prompt=1000.0 is not text: quote it for Hydra"),
        ("prompt=null", "prompt=None is not text"),
    ],
)
def test_generate_cli_settings_fail_before_the_weights_load(override, message):
    from hydra import compose, initialize_config_dir

    from gpt2_lightning.generate import _run

    conf = Path(__file__).parent.parent / "gpt2_lightning" / "conf"
    with initialize_config_dir(str(conf), version_base=None):
        cfg = compose("generate", overrides=["checkpoint=/nonexistent.ckpt", override])
    with pytest.raises(ValueError) as error:
        _run(cfg)  # the checkpoint does not exist: the setting must be refused first
    assert str(error.value).startswith(message)


def test_generate_cli_stops_on_an_id_the_tokenizer_lacks(tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from gpt2_lightning.generate import _run

    torch.manual_seed(0)
    padded = GPT(
        GPTConfig(vocab_size=50304, context_length=16, emb_dim=16, num_layers=1, num_heads=2)
    )
    with torch.no_grad():  # every greedy step picks 50300 or 50301: padding ids
        direction = torch.randn(16)
        padded.tok_emb.weight.zero_()
        padded.tok_emb.weight[50300], padded.tok_emb.weight[50301] = direction, -direction
    state = {f"model.{k}": v for k, v in padded.state_dict().items()}
    ckpt = tmp_path / "padded.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"model": padded.cfg.to_dict()}}, ckpt)
    conf = Path(__file__).parent.parent / "gpt2_lightning" / "conf"
    with initialize_config_dir(str(conf), version_base=None):
        cfg = compose("generate", overrides=[f"checkpoint={ckpt}", "temperature=0"])
    with pytest.raises(ValueError, match=r"the model sampled id 5030[01], which the GPT-2 tok"):
        _run(cfg)


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("top_kk=5", "top_kk=5: the config has no key 'top_kk' (it has: checkpoint, prompt, "),
        ("prompt=Hello, world", "'prompt=Hello, world' is a list of values to Hydra (a sweep)"),
        ("prompt=it's", '"prompt=it\'s" is not an override Hydra can read'),
        ("prompt=héllo", "'prompt=héllo' is not an override Hydra can read"),
        ("+foo=1", "'+foo=1': generate takes only its own keys (checkpoint, prompt, "),
        ("~top_k", "'~top_k': generate takes only its own keys"),
        ("-m", "generate runs once: -m/--multirun is for train's sweeps"),
    ],
)
def test_generate_command_line_mistakes_are_one_line(arg, message):
    from gpt2_lightning.cli import check_generate_command

    with pytest.raises(ValueError) as error:
        check_generate_command(["checkpoint=tiny.ckpt", arg])
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)
    check_generate_command(["checkpoint=tiny.ckpt", "'prompt=\"Hello, world\"'".strip("'")])


def test_generate_cli_unknown_key_exits_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gpt2_lightning.generate", "top_kk=5"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: top_kk=5: the config has no key 'top_kk'")
    assert result.stderr.count("\n") == 1 and result.stdout == ""


def test_generate_cli_stops_quietly_when_the_reader_goes_away(tmp_path):
    model = GPT(
        GPTConfig(vocab_size=50257, context_length=64, emb_dim=16, num_layers=1, num_heads=2)
    )
    model.save_pretrained(tmp_path / "tiny-hf")
    # `generate ... | head -c 0`: the pipe is closed long before the first token (imports alone
    # take a second), so every write fails with EPIPE
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpt2_lightning.generate",
            "checkpoint=tiny-hf",
            "max_new_tokens=50",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 1
    assert stderr == ""  # was "error: [Errno 32] Broken pipe"


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
