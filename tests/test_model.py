"""The from-scratch GPT-2 of gpt2_lightning.model: sizes, causality, init, norms, cache, padding."""

from __future__ import annotations

import ast
import math
from itertools import pairwise
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2_lightning import GPT, GPTConfig, KVCache
from gpt2_lightning import model as model_module
from gpt2_lightning.model import LayerNorm, RMSNorm

# Parameter counts of the released GPT-2 models (lm_head tied to the token embedding).
PARAMETER_COUNTS = {
    "124M": 124_439_808,
    "355M": 354_823_168,
    "774M": 774_030_080,
    "1558M": 1_557_611_200,
}
ALIASES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}


def small_config(**overrides) -> GPTConfig:
    """Two layers of width 32 on GPT-2's vocabulary: fast, yet every code path of the real thing."""
    return GPTConfig(
        **{"context_length": 32, "emb_dim": 32, "num_layers": 2, "num_heads": 4, **overrides}
    )


def small_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(small_config(**overrides)).eval()


def meta_model(name: str) -> GPT:
    # No storage on the meta device: the 1.5B model is counted without allocating 6 GB.
    with torch.device("meta"):
        return GPT(GPTConfig.from_name(name))


@pytest.mark.parametrize("size", PARAMETER_COUNTS)
def test_parameter_count_of_released_sizes(size):
    assert meta_model(size).num_parameters() == PARAMETER_COUNTS[size]


@pytest.mark.parametrize("alias", ALIASES)
def test_hugging_face_aliases_name_the_same_configs(alias):
    size = ALIASES[alias]
    assert GPTConfig.from_name(alias) == GPTConfig.from_name(size)
    assert meta_model(alias).num_parameters() == PARAMETER_COUNTS[size]


def test_logits_at_a_position_do_not_depend_on_later_tokens():
    model = small_model()
    torch.manual_seed(1)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 16))
    changed = idx.clone()
    t = 7
    changed[:, t + 1 :] = (idx[:, t + 1 :] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        before, after = model(idx), model(changed)
    assert (before[:, : t + 1] - after[:, : t + 1]).abs().max().item() < 1e-5
    # Every later position sees its own changed token, so every one of them must move.
    later_change = (before[:, t + 1 :] - after[:, t + 1 :]).abs().amax(dim=-1)
    assert later_change.min().item() > 1e-3


def test_initial_loss_is_that_of_a_uniform_guess():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny")).eval()
    vocab_size = model.cfg.vocab_size
    idx = torch.randint(0, vocab_size, (4, 64))
    targets = torch.randint(0, vocab_size, (4, 64))  # independent of idx: nothing to learn
    with torch.no_grad():
        logits = model(idx)
    loss = F.cross_entropy(logits.view(-1, vocab_size), targets.view(-1)).item()
    assert abs(loss - math.log(vocab_size)) < 0.3  # ln(50257) = 10.82


# float64 tests the formula; in float32 the rounding alone reaches ~1e-6.
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_layernorm_is_the_formula(dtype, tolerance):
    torch.manual_seed(0)
    ours = LayerNorm(64).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(64) + 1.0)
        ours.bias.copy_(torch.randn(64))
    x = torch.randn(4, 16, 64, dtype=dtype) * 3 + 1
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # no Bessel correction
    expected = (x - mean) / torch.sqrt(var + 1e-5) * ours.weight + ours.bias
    assert (ours(x) - expected).abs().max().item() < tolerance
    reference = torch.nn.LayerNorm(64, eps=1e-5).to(dtype)
    reference.load_state_dict(ours.state_dict())  # same parameter names as torch's
    assert (ours(x) - reference(x)).abs().max().item() < tolerance


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_rmsnorm_matches_torch(dtype, tolerance):
    torch.manual_seed(0)
    ours, reference = RMSNorm(64).to(dtype), torch.nn.RMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(64) + 1.0)
        reference.load_state_dict(ours.state_dict())
    x = torch.randn(4, 16, 64, dtype=dtype) * 3 + 1
    assert (ours(x) - reference(x)).abs().max().item() < tolerance


def test_rmsnorm_config_builds_and_runs():
    layernorm_model = small_model()
    model = small_model(norm="rmsnorm")
    norms = [m for m in model.modules() if isinstance(m, (LayerNorm, RMSNorm))]
    assert len(norms) == 2 * model.cfg.num_layers + 1
    assert all(isinstance(m, RMSNorm) for m in norms)
    # RMSNorm has no bias: one emb_dim vector fewer per norm than LayerNorm.
    missing = layernorm_model.num_parameters() - model.num_parameters()
    assert missing == len(norms) * model.cfg.emb_dim
    with torch.no_grad():
        logits = model(torch.randint(0, model.cfg.vocab_size, (2, 8)))
    assert logits.shape == (2, 8, model.cfg.vocab_size)
    assert torch.isfinite(logits).all()


def test_unknown_size_name_is_refused():
    with pytest.raises(ValueError, match=r"unknown model size '7B'.*124M"):
        GPTConfig.from_name("7B")


def test_emb_dim_not_divisible_by_num_heads_is_refused():
    with pytest.raises(ValueError, match=r"emb_dim=30 .*num_heads=4"):
        GPTConfig(emb_dim=30, num_heads=4)


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match=r"norm='batchnorm'.*layernorm, rmsnorm"):
        GPTConfig(norm="batchnorm")


def test_a_config_changed_after_creation_is_checked_again_by_the_model():
    cfg = GPTConfig.from_name("tiny", num_layers=1)
    cfg.norm = "LayerNorm"  # a dataclass field can be set: GPT must not build RMSNorm from it
    with pytest.raises(ValueError, match=r"norm='LayerNorm' is unknown"):
        GPT(cfg)
    cfg.norm, cfg.num_heads = "layernorm", 3
    with pytest.raises(ValueError, match=r"emb_dim=128 is not divisible by num_heads=3"):
        GPT(cfg)


def test_ids_without_a_batch_dimension_are_refused():
    with pytest.raises(
        ValueError, match=r"idx of shape \(5,\) is invalid: must be \(batch, tokens\)"
    ):
        small_model()(torch.zeros(5, dtype=torch.long))


def test_input_longer_than_context_is_refused():
    model = small_model()
    idx = torch.zeros(1, model.cfg.context_length + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"sequence length 33 exceeds context_length=32"):
        model(idx)


def test_lm_head_is_tied_to_the_token_embedding():
    model = small_model()
    assert model.lm_head.weight is model.tok_emb.weight
    untied = sum(p.numel() for p in model.parameters()) + model.tok_emb.weight.numel()
    assert model.num_parameters() == untied - model.cfg.vocab_size * model.cfg.emb_dim


def test_residual_projections_start_smaller():
    torch.manual_seed(0)
    cfg = GPTConfig.from_name("tiny")
    model = GPT(cfg)
    expected = 0.02 / math.sqrt(2 * cfg.num_layers)  # 0.00707 for 4 layers
    for block in model.blocks:
        for residual in (block.attn.out_proj, block.ff.proj):
            assert residual.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert block.ff.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_kv_cache_in_chunks_equals_a_full_forward():
    model = small_model()
    torch.manual_seed(1)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 20))
    cache = KVCache(model.cfg, batch_size=2)
    # Multi-token chunks after the first exercise the offset causal mask; 1-token ones the
    # decoding path.
    bounds = [0, 7, 8, 9, 15, 20]
    with torch.no_grad():
        full = model(idx)
        chunks = [model(idx[:, a:b], kv_cache=cache) for a, b in pairwise(bounds)]
    assert cache.length == 20
    assert (torch.cat(chunks, dim=1) - full).abs().max().item() < 1e-5


def padded_batch(short: list[int], long: list[int], pad_id: int = 50256):
    pad = len(long) - len(short)
    idx = torch.tensor([[pad_id] * pad + short, long])
    attention_mask = torch.tensor([[0] * pad + [1] * len(short), [1] * len(long)])
    return idx, attention_mask, pad


def test_left_padding_gives_the_logits_of_the_prompt_alone():
    model = small_model()
    short, long = [464, 3290, 318, 257, 922], [15496, 11, 314, 716, 257, 3303, 2746, 13]
    idx, attention_mask, pad = padded_batch(short, long)
    with torch.no_grad():
        batched = model(idx, attention_mask=attention_mask)
        alone_short, alone_long = model(torch.tensor([short])), model(torch.tensor([long]))
    assert (batched[0, pad:] - alone_short[0]).abs().max().item() < 1e-5
    assert (batched[1] - alone_long[0]).abs().max().item() < 1e-5


def test_left_padding_with_kv_cache_matches_the_prompt_alone():
    model = small_model()
    short, long = [464, 3290, 318], [15496, 11, 314, 716, 257, 3303]
    idx, attention_mask, pad = padded_batch(short, long)
    next_ids = torch.tensor([[922], [2746]])
    cache = KVCache(model.cfg, batch_size=2)
    with torch.no_grad():
        model(idx, kv_cache=cache, attention_mask=attention_mask)
        step = model(
            next_ids, kv_cache=cache, attention_mask=F.pad(attention_mask, (0, 1), value=1)
        )
        alone = model(torch.tensor([short + [922]]))
    assert (step[0, -1] - alone[0, -1]).abs().max().item() < 1e-5


def test_last_only_gives_the_last_positions_logits():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", num_layers=2)).eval()
    idx = torch.randint(0, 50257, (2, 9))
    last = model(idx, last_only=True)
    assert last.shape == (2, 1, 50257)
    assert (last[:, 0] - model(idx)[:, -1]).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("qkv_bias", "no", "qkv_bias='no' is invalid: must be True or False"),
        ("vocab_size", True, "vocab_size=True is invalid: must be a positive integer"),
    ],
)
def test_config_refuses_values_of_the_wrong_type(field, value, message):
    with pytest.raises(ValueError) as error:
        GPTConfig(**{**GPTConfig.from_name("tiny").to_dict(), field: value})
    assert str(error.value) == message


def test_the_model_imports_only_torch_and_the_standard_library():
    nodes = list(ast.walk(ast.parse(Path(model_module.__file__).read_text())))
    names = [a.name for node in nodes if isinstance(node, ast.Import) for a in node.names]
    names += [node.module for node in nodes if isinstance(node, ast.ImportFrom)]
    assert {name.split(".")[0] for name in names} == {"__future__", "dataclasses", "math", "torch"}
    linears = {type(m) for m in small_model().modules() if isinstance(m, torch.nn.Linear)}
    assert linears == {torch.nn.Linear}  # the plain layer: CPU speed-ups live in fast_decode
