"""gpt2_lightning.fast_decode: the split product, half-precision copies, and which CPU gets what."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from gpt2_lightning import GPT, GPTConfig, fast_decode, generate
from gpt2_lightning.fast_decode import (
    _COPIES,
    FP16Linear,
    NarrowLinear,
    SplitLinear,
    decoder,
    split_linear,
)

pytestmark = pytest.mark.usefixtures("one_thread")

needs_fbgemm = pytest.mark.skipif(
    "fbgemm" not in torch.backends.quantized.supported_engines,
    reason="fbgemm's fp16 products exist on x86 builds of torch only",
)


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name("tiny", **{"num_layers": 1, **overrides}))


def split(linear: torch.nn.Linear) -> SplitLinear:
    return SplitLinear(linear.weight, linear.bias)


@pytest.fixture
def splitting(monkeypatch) -> list[tuple]:
    """An AMD CPU with MKL and two threads; the calls of split_linear are recorded."""
    calls = []
    monkeypatch.setattr(fast_decode, "splits_few_rows", lambda: True)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(
        fast_decode, "split_linear", lambda *args: calls.append(args) or split_linear(*args)
    )
    return calls


def test_a_matrix_with_fewer_rows_than_threads_takes_the_plain_path():
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        torch.manual_seed(0)
        linear = torch.nn.Linear(1 << 15, 3)  # 3 output rows: no slice of rows for 4 threads
        x = torch.randn(1, 1 << 15)
        assert torch.allclose(split(linear)(x), F.linear(x, linear.weight, linear.bias))
    finally:
        torch.set_num_threads(threads)


# divisible by the parts, and with a remainder; the last two are wide (the head's orientation)
@pytest.mark.parametrize("out_features", [12, 13, 128, 129])
@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(1, 1), (2, 1), (3,)])  # a decode step, batch 2, plain rows
def test_split_linear_equals_linear(out_features, parts, bias, lead):
    torch.manual_seed(0)
    weight, x = torch.randn(out_features, 8), torch.randn(*lead, 8)
    b = torch.randn(out_features) if bias else None
    y = split_linear(x, weight, b, parts)
    assert y.shape == (*lead, out_features)
    torch.testing.assert_close(y, F.linear(x, weight, b), rtol=1e-5, atol=1e-6)


def test_split_product_splits_only_few_fp32_rows(splitting):
    layer = torch.nn.Linear(8, 16)
    limit = fast_decode.SPLIT_MAX_ROWS
    for x in (torch.randn(1, 1, 8), torch.randn(limit, 8)):  # a decode step; the most rows
        torch.testing.assert_close(split(layer)(x), F.linear(x, layer.weight, layer.bias))
    assert [args[0].shape for args in splitting] == [(1, 1, 8), (limit, 8)]
    assert splitting[0][3] == 2  # one slice per thread
    split(layer)(torch.randn(limit + 1, 8))  # more rows: the plain product
    split(layer.double())(torch.randn(1, 8, dtype=torch.float64))  # not fp32
    assert len(splitting) == 2


def test_split_product_leaves_autocast_inputs_to_autocast(splitting):
    layer = split(torch.nn.Linear(8, 16))  # fp32 weights
    x = torch.randn(2, 8).bfloat16()  # what autocast hands on after a bf16 op
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    with pytest.raises(RuntimeError):  # outside autocast a mismatch stays an error, as in F.linear
        layer(x)
    assert splitting == []


@pytest.mark.parametrize(
    ("cpuinfo", "vendor", "splits"),
    [
        ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n", "AuthenticAMD", True),
        ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n", "GenuineIntel", False),
        ("processor\t: 0\nBogoMIPS\t: 50.00\n", "", False),  # an Arm board names no vendor_id
        (None, "", False),  # no /proc/cpuinfo: not Linux
    ],
)
def test_few_rows_are_split_on_amd_cpus_only(monkeypatch, tmp_path, cpuinfo, vendor, splits):
    real_path = fast_decode.Path
    fake = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        fake.write_text(cpuinfo)

    def path(name):
        return fake if name == "/proc/cpuinfo" else real_path(name)

    monkeypatch.setattr(fast_decode, "Path", path)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    fast_decode.splits_few_rows.cache_clear()
    try:
        assert fast_decode.cpu_vendor() == vendor
        assert fast_decode.splits_few_rows() is splits
        monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)  # e.g. OpenBLAS
        fast_decode.splits_few_rows.cache_clear()
        assert fast_decode.splits_few_rows() is False
    finally:
        fast_decode.splits_few_rows.cache_clear()  # the next caller reads the real machine


def test_fp32_steps_run_the_model_itself_where_nothing_is_split(monkeypatch):
    monkeypatch.setattr(fast_decode, "splits_few_rows", lambda: False)  # e.g. an Intel CPU
    model = tiny()
    assert decoder(model) is model and decoder(model, torch.float32) is model


def test_fp32_steps_on_amd_split_the_large_products_of_a_copy_sharing_the_weights(splitting):
    model = tiny(dropout=0.5)  # in training mode
    fast = decoder(model)
    assert fast is not model and not fast.training and model.training
    assert decoder(model) is fast  # kept
    # Split: the head and the feed-forward's (128 x 512); the attention's qkv (384 x 128) is
    # under SPLIT_MIN_WEIGHTS and stays the model's own layer.
    assert isinstance(fast.lm_head, SplitLinear) and isinstance(fast.blocks[0].ff.fc, SplitLinear)
    assert fast.blocks[0].attn.qkv is not model.blocks[0].attn.qkv
    assert type(fast.blocks[0].attn.qkv) is torch.nn.Linear
    assert {id(p) for p in fast.parameters()} == {id(p) for p in model.parameters()}
    assert fast.lm_head.weight is fast.tok_emb.weight is model.tok_emb.weight
    idx = torch.randint(0, 50257, (2, 4))
    model.eval()
    with torch.no_grad():
        assert (fast(idx, last_only=True) - model(idx, last_only=True)).abs().max() < 1e-5
    assert splitting  # the products did split


def test_generation_on_amd_runs_the_split_copy_with_the_same_ids(monkeypatch, splitting):
    model = tiny(num_layers=2).eval()
    idx = torch.randint(0, 50257, (2, 4))
    split_ids = generate(model, idx, 6, temperature=0)
    assert len(splitting) > 6  # the prompt and every step
    monkeypatch.setattr(fast_decode, "splits_few_rows", lambda: False)
    assert torch.equal(split_ids, generate(model, idx, 6, temperature=0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_weights_multiply_in_their_dtype_and_answer_in_the_input_dtype(dtype):
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 16)
    x = torch.randn(2, 1, 8)
    expected = F.linear(x.to(dtype), layer.weight.to(dtype), layer.bias.to(dtype)).float()
    layer.to(dtype)
    y = NarrowLinear(layer.weight, layer.bias)(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, expected)  # the product ran in dtype: the same rounding
    assert (y - x @ layer.weight.float().T - layer.bias.float()).abs().max() > 0


def test_low_precision_copy_converts_the_products_weights_once_and_keeps_the_tie():
    model = tiny(dropout=0.5)  # in training mode
    low = decoder(model, torch.bfloat16)
    assert not low.training  # no dropout in the steps, whatever mode the model is in
    assert isinstance(low.lm_head, NarrowLinear)
    assert low.lm_head.weight is low.tok_emb.weight  # still tied: one matrix, not two
    assert low.tok_emb.weight.dtype == low.blocks[0].ff.fc.bias.dtype == torch.bfloat16
    assert torch.equal(low.blocks[0].ff.fc.weight, model.blocks[0].ff.fc.weight.bfloat16())
    # Norms and the position embedding are the model's own, shared, not copied.
    assert low.final_norm.weight is model.final_norm.weight
    assert low.pos_emb.weight is model.pos_emb.weight
    assert sum(p.numel() for p in low.parameters()) == model.num_parameters()
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_low_precision_copy_is_kept_and_follows_the_models_weights():
    model = tiny()
    low = decoder(model, torch.bfloat16)
    with torch.no_grad():
        model.blocks[0].ff.fc.weight.add_(1.0)  # e.g. a training step between two generate calls
    again = decoder(model, torch.bfloat16)
    assert again is low  # the same memory, refilled
    assert torch.equal(again.blocks[0].ff.fc.weight, model.blocks[0].ff.fc.weight.bfloat16())
    half = decoder(model, torch.float16)  # another dtype gets a copy of its own
    assert decoder(model, torch.bfloat16) is low and decoder(model, torch.float16) is half
    model.blocks[0].ff.fc.weight = torch.nn.Parameter(torch.zeros(512, 128))  # a new parameter
    fresh = decoder(model, torch.bfloat16)
    assert fresh is not low
    assert torch.float16 not in _COPIES[model]  # the fp16 copy of the old parameter went with it
    assert torch.equal(fresh.blocks[0].ff.fc.weight, torch.zeros(512, 128, dtype=torch.bfloat16))
    model.final_norm.weight = torch.nn.Parameter(torch.full((128,), 2.0))  # shared, not converted
    assert decoder(model, torch.bfloat16).final_norm.weight is model.final_norm.weight


@pytest.mark.parametrize("missing", ["fbgemm", "avx2"])
def test_fp16_copy_converts_the_weights_where_fbgemm_is_missing(monkeypatch, missing):
    if missing == "fbgemm":  # e.g. an Arm build of torch
        monkeypatch.setattr(fast_decode, "_fbgemm_fp16", lambda params: False)
    else:  # an x86 CPU older than AVX2, which fbgemm refuses
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    model = tiny()
    low = decoder(model, torch.float16)
    assert low.lm_head.weight is low.tok_emb.weight
    assert low.tok_emb.weight.dtype == low.blocks[0].ff.fc.bias.dtype == torch.float16
    assert torch.equal(low.blocks[0].ff.fc.weight, model.blocks[0].ff.fc.weight.half())


@needs_fbgemm
def test_fp16_copy_multiplies_the_rounded_weights_in_fp32_with_fbgemm():
    model = tiny()
    low = decoder(model, torch.float16)
    assert isinstance(low.lm_head, FP16Linear) and isinstance(low.blocks[0].attn.qkv, FP16Linear)
    # Embeddings and norms are the model's own fp32 parameters, shared, not copied.
    assert low.tok_emb.weight is model.tok_emb.weight
    assert low.final_norm.weight is model.final_norm.weight
    x = torch.randn(3, 1, 128)
    pairs = [(low.lm_head, model.lm_head), (low.blocks[0].ff.fc, model.blocks[0].ff.fc)]
    for ours, theirs in pairs:
        rounded = theirs.weight.half().float()
        expected = F.linear(x, rounded, theirs.bias)
        y = ours(x)
        assert y.dtype == torch.float32 and y.shape == expected.shape
        assert (y - expected).abs().max() < 1e-5  # fp32 products of the fp16-rounded weights
        assert (y - theirs(x)).abs().max() > 1e-5  # ... which are not the fp32 weights


@needs_fbgemm
def test_fp16_copy_packs_again_only_what_changed_even_unseen_by_version_counters():
    model = tiny(num_layers=2)
    low = decoder(model, torch.float16)
    packed = {name: m.packed for name, m in low.named_modules() if hasattr(m, "packed")}
    fc = model.blocks[1].ff.fc
    fc.weight.data.mul_(-1.0)  # through .data: the parameter's version counter does not move
    fc.bias.data.add_(1.0)
    assert decoder(model, torch.float16) is low
    repacked = {name for name, m in low.named_modules() if hasattr(m, "packed")}
    repacked = {name for name in repacked if low.get_submodule(name).packed is not packed[name]}
    assert repacked == {"blocks.1.ff.fc"}
    x = torch.randn(2, 1, 128)
    expected = F.linear(x, fc.weight.half().float(), fc.bias)
    assert (low.blocks[1].ff.fc(x) - expected).abs().max() < 1e-5
    # Decoding follows the new weights: the same ids as a fresh copy of the changed model.
    idx = torch.randint(0, 50257, (1, 4))
    fresh = GPT(model.cfg)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(
        generate(model, idx, 6, temperature=0, dtype=torch.float16),
        generate(fresh, idx, 6, temperature=0, dtype=torch.float16),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_copy_goes_with_its_model(dtype):
    model = tiny()
    decoder(model, dtype)
    assert model in _COPIES
    alive = weakref.ref(model)
    del model
    gc.collect()  # which may also free other tests' models: count only this one
    assert alive() is None  # the copy does not keep its model alive, and its entry went with it
