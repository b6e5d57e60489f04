"""Official weights: loading Hugging Face GPT-2 folders, exporting to them, downloading them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import transformers
from conftest import save_training_checkpoint
from huggingface_hub.errors import LocalEntryNotFoundError

from gpt2_lightning import GPT, GPTConfig, get_tokenizer, weights
from gpt2_lightning.weights import EXPORTED_FILES, WeightsError, load_pretrained, save_pretrained

# Odd sizes, so that a transposed or swapped matrix cannot go unnoticed.
VOCAB, CONTEXT = 1000, 40


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_model() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=48,
        n_layer=3,
        n_head=3,
        n_positions=CONTEXT,
        vocab_size=VOCAB,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def hf_folder(hf_model: transformers.GPT2LMHeadModel, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    hf_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def idx() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(1))


def max_diff(ours: GPT, theirs: transformers.GPT2LMHeadModel, idx: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours.eval()(idx) - theirs.eval()(idx).logits).abs().max().item()


def test_hf_folder_loads_with_the_same_logits(hf_model, hf_folder: Path, idx) -> None:
    model = GPT.from_pretrained(hf_folder)
    assert model.cfg == GPTConfig(
        vocab_size=VOCAB, context_length=CONTEXT, emb_dim=48, num_layers=3, num_heads=3, dropout=0.0
    )
    assert model.lm_head.weight is model.tok_emb.weight  # still tied after loading
    assert model.num_parameters() == hf_model.num_parameters()
    assert max_diff(model, hf_model, idx) < 1e-4


@pytest.mark.parametrize("layout", ["pytorch_model.bin", "no transformer. prefix"])
def test_other_hf_layouts_load(hf_model, idx, tmp_path: Path, layout: str) -> None:
    if layout == "pytorch_model.bin":
        hf_model.config.save_pretrained(tmp_path)
        # 'transformer.' names, lm_head.weight, and the causal-mask buffers older transformers
        # versions saved (the official .bin files have them): all but the weights are ignored
        state = dict(hf_model.state_dict())
        for layer in range(3):
            state[f"transformer.h.{layer}.attn.bias"] = torch.ones(1, 1, CONTEXT, CONTEXT).tril()
            state[f"transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(state, tmp_path / "pytorch_model.bin")
    else:
        hf_model.transformer.save_pretrained(tmp_path)  # GPT2Model: 'wte.weight', 'h.0...'
    assert max_diff(load_pretrained(tmp_path), hf_model, idx) < 1e-4


def test_save_pretrained_loads_in_transformers(idx, tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = GPT(
        GPTConfig(vocab_size=VOCAB, context_length=CONTEXT, emb_dim=48, num_layers=3, num_heads=3)
    )
    save_pretrained(model, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "config.json",
        "generation_config.json",
        "merges.txt",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["tie_word_embeddings"]
    # no <|endoftext|> in a 1000-token vocabulary: nothing to stop at
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "export")
    assert generation.eos_token_id is None and generation.bos_token_id is None
    hf_model, info = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path / "export", output_loading_info=True, attn_implementation="eager"
    )
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    assert max_diff(model, hf_model, idx) < 1e-4


def test_save_pretrained_leaves_nothing_behind_on_failure(tmp_path, monkeypatch) -> None:
    def fail(*args, **kwargs) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(weights, "save_file", fail)
    model = GPT(GPTConfig(vocab_size=VOCAB, context_length=8, emb_dim=8, num_layers=1, num_heads=1))
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a staging folder


def test_rmsnorm_cannot_be_exported(tmp_path: Path) -> None:
    model = GPT(
        GPTConfig(
            vocab_size=VOCAB, context_length=8, emb_dim=8, num_layers=1, num_heads=1, norm="rmsnorm"
        )
    )
    with pytest.raises(ValueError, match="norm='rmsnorm' cannot be exported"):
        model.save_pretrained(tmp_path / "export")
    assert not (tmp_path / "export").exists()


def run_offline(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a command as on a machine without network: any download fails at once."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(cwd / "hf_home"),
        "OMP_NUM_THREADS": "1",  # as in one_thread above
    }
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def run_weights_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_offline([sys.executable, "-m", "gpt2_lightning.weights", *args], cwd)


def test_export_cli_writes_a_folder_with_the_same_model(idx, tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = GPT(
        GPTConfig(vocab_size=VOCAB, context_length=CONTEXT, emb_dim=48, num_layers=3, num_heads=3)
    )
    # the layout the training module's checkpoints have
    state = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    checkpoint = {"hyper_parameters": {"model": model.cfg.to_dict()}, "state_dict": state}
    torch.save(checkpoint, tmp_path / "last.ckpt")

    result = run_weights_cli("export", "last.ckpt", "exported", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == sorted(EXPORTED_FILES)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert tokenizer.encode("hello world<|endoftext|>") == [31373, 995, 50256]
    assert tokenizer.model_max_length == CONTEXT
    loaded = load_pretrained(tmp_path / "exported")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        assert (loaded(idx) - model(idx)).abs().max().item() < 1e-6

    again = run_weights_cli("export", "last.ckpt", "exported", cwd=tmp_path)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [
        "error: 'exported' exists and is not empty: choose another or add --force"
    ]
    forced = run_weights_cli("export", "last.ckpt", "exported", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr


def refuse_network(*args, **kwargs) -> None:
    raise OSError("network access is disabled in this test")


def continuation_log_likelihood(model: GPT, context: str, continuation: str) -> tuple[float, bool]:
    """log P(continuation | context) by our model, and whether greedy decoding gives it."""
    enc = get_tokenizer()
    # An empty context is scored after <|endoftext|>, as lm-eval does (its prefix token).
    context_ids = enc.encode(context, allowed_special="all") or [enc.eot_token]
    continuation_ids = enc.encode(continuation)
    with torch.no_grad():
        logits = model(torch.tensor([context_ids + continuation_ids]))[0].double()
    predicted = logits[len(context_ids) - 1 : -1]  # the positions that predict the continuation
    log_probs = predicted.log_softmax(-1)[range(len(continuation_ids)), continuation_ids]
    return log_probs.sum().item(), predicted.argmax(-1).tolist() == continuation_ids


def test_lm_eval_scores_an_exported_folder_offline_as_our_model_does(tmp_path, monkeypatch):
    # What `lm_eval --model hf --model_args pretrained=<folder>` builds; lm-eval[hf] brings
    # the accelerate it imports.
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance

    torch.manual_seed(5)
    model = GPT(
        GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, num_layers=2, num_heads=2)
    ).eval()
    # Peaked predictions: a token scored at the wrong position moves the sum far past 1e-4.
    torch.nn.init.normal_(model.tok_emb.weight, std=0.5)
    model.save_pretrained(tmp_path / "hf")
    pairs = [
        ("The cat sat on", " the mat"),
        ("", "Hello world"),  # lm-eval puts the tokenizer's bos_token, <|endoftext|>, first
        ("Déjà vu à 東京", " 🍣 and 42!"),
        ("One document.<|endoftext|>Another", " one"),
    ]
    enc = get_tokenizer()
    for context, continuation in pairs:  # lm-eval splits the joined ids where ours do
        joined = enc.encode(context + continuation, allowed_special="all")
        assert joined == enc.encode(context, allowed_special="all") + enc.encode(continuation)

    # HF_HUB_OFFLINE=1 as the hub reads it (once, at import), and no socket can connect.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", refuse_network)
    monkeypatch.setattr(socket, "create_connection", refuse_network)
    lm = huggingface.HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=2)
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    scores = lm.loglikelihood(requests)  # died at `assert len(context_enc) > 0` before
    for (context, continuation), (log_likelihood, is_greedy) in zip(pairs, scores, strict=True):
        ours, greedy = continuation_log_likelihood(model, context, continuation)
        assert log_likelihood == pytest.approx(ours, abs=1e-4), (context, continuation)
        assert is_greedy is greedy


def test_export_over_an_older_folder_replaces_its_generation_settings(tmp_path: Path) -> None:
    cfg = GPTConfig(vocab_size=50257, context_length=8, emb_dim=16, num_layers=1, num_heads=2)
    model = GPT(cfg)
    target = tmp_path / "hf"
    target.mkdir()
    (target / "generation_config.json").write_text('{"do_sample": true, "eos_token_id": 7}')
    (target / "README.md").write_text("mine")  # files export does not write stay
    # but another tokenizer's tokenizer.json goes: transformers would read it instead of ours
    (target / "tokenizer.json").write_text("{}")
    save_pretrained(model, target)
    written = json.loads((target / "generation_config.json").read_text())
    assert written == {"bos_token_id": 50256, "eos_token_id": 50256}  # do_sample is gone
    generation = transformers.GenerationConfig.from_pretrained(target)
    assert (generation.eos_token_id, generation.bos_token_id) == (50256, 50256)
    assert (target / "README.md").read_text() == "mine"
    assert not (target / "tokenizer.json").exists()
    assert transformers.AutoTokenizer.from_pretrained(target).encode("hello world") == [31373, 995]


def write_bin_shards(hf_model: transformers.GPT2LMHeadModel, folder: Path) -> None:
    """pytorch_model-0000k-of-00002.bin shards and their index, as older transformers wrote."""
    hf_model.config.save_pretrained(folder)
    state = hf_model.state_dict()
    names = sorted(state)
    weight_map = {}
    for k, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        shard = f"pytorch_model-0000{k}-of-00002.bin"
        torch.save({name: state[name] for name in part}, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_sharded_hf_folders_load(hf_model, idx, tmp_path: Path, kind: str) -> None:
    if kind == "safetensors":
        hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
        index = tmp_path / "model.safetensors.index.json"
    else:
        write_bin_shards(hf_model, tmp_path)
        index = tmp_path / "pytorch_model.bin.index.json"
    shards = set(json.loads(index.read_text())["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / shard).is_file() for shard in shards)
    assert not (tmp_path / "model.safetensors").exists()
    assert max_diff(load_pretrained(tmp_path), hf_model, idx) < 1e-4


@pytest.mark.parametrize(
    "change, message",
    [
        ("index not json", r"index.json is not a JSON object \(Expecting value"),
        ("index a list", r"index.json is not a JSON object \('list' object has no attribute"),
        ("no weight_map", r'index.json has no "weight_map" object naming the shard files'),
        ("path as shard", r"index.json names '../outside.bin' as a shard: not a file name"),
        ("shard missing", r"names the shard pytorch_model-00002-of-00002.bin, which is not in"),
        ("shard broken", r"pytorch_model-00002-of-00002.bin is not a readable weights file"),
        ("tensor missing", r"do not fit a 3-layer GPT-2: missing \['h.2.mlp.c_proj.bias'\]"),
    ],
)
def test_broken_shards_are_named_in_one_line(hf_model, tmp_path, change, message) -> None:
    write_bin_shards(hf_model, tmp_path)
    index_file = tmp_path / "pytorch_model.bin.index.json"
    index = json.loads(index_file.read_text())
    second = tmp_path / "pytorch_model-00002-of-00002.bin"
    if change == "index not json":
        index_file.write_text("")
    elif change == "index a list":
        index_file.write_text("[]")
    elif change == "no weight_map":
        index_file.write_text('{"metadata": {}}')
    elif change == "path as shard":
        index["weight_map"]["transformer.wte.weight"] = "../outside.bin"
        index_file.write_text(json.dumps(index))
    elif change == "shard missing":
        second.unlink()
    elif change == "shard broken":
        second.write_bytes(b"garbage")
    else:  # a shard that lacks a tensor its index names
        torch.save(
            {k: v for k, v in torch.load(second).items() if k != "transformer.h.2.mlp.c_proj.bias"},
            second,
        )
    with pytest.raises(WeightsError, match=message) as error:
        load_pretrained(tmp_path)
    assert "\n" not in str(error.value)


class FakeHub:
    """Stands in for huggingface_hub.hf_hub_download, serving files from a local folder."""

    def __init__(self, folder: Path, error: Exception | None = None):
        self.folder, self.error, self.calls = folder, error, []

    def __call__(self, repo_id: str, filename: str, **kwargs) -> str:
        self.calls.append((repo_id, filename))
        if self.error is not None:
            raise self.error
        return str(self.folder / filename)


@pytest.mark.parametrize(
    ("name", "repo"),
    [
        ("124M", "openai-community/gpt2"),
        ("gpt2-medium", "openai-community/gpt2-medium"),
        ("1558M", "openai-community/gpt2-xl"),
    ],
)
def test_size_names_download_their_repository(
    hf_model, hf_folder, idx, monkeypatch, name: str, repo: str
) -> None:
    hub = FakeHub(hf_folder)  # the same tiny model stands in for every size
    monkeypatch.setattr(weights, "hf_hub_download", hub)
    model = GPT.from_pretrained(name)
    assert hub.calls == [(repo, "config.json"), (repo, "model.safetensors")]
    assert max_diff(model, hf_model, idx) < 1e-4


def test_offline_download_names_the_repository(hf_folder, monkeypatch) -> None:
    offline = LocalEntryNotFoundError("cannot find the requested files in the local cache")
    monkeypatch.setattr(weights, "hf_hub_download", FakeHub(hf_folder, offline))
    with pytest.raises(WeightsError) as raised:
        GPT.from_pretrained("124M")
    message = str(raised.value)
    assert "\n" not in message
    assert "cannot download openai-community/gpt2 from the Hugging Face hub" in message
    assert "python -m gpt2_lightning.weights download 124M" in message
    assert "local folder" in message


def test_download_cli_offline_prints_one_line(tmp_path: Path) -> None:
    result = run_weights_cli("download", "355M", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot download openai-community/gpt2-medium")


def test_unknown_name_lists_the_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'gpt5' is neither .* valid sizes are 124M, 355M"):
        load_pretrained("gpt5")
    with pytest.raises(WeightsError, match="has no config.json"):
        load_pretrained(tmp_path)


def test_config_that_our_model_cannot_match_is_refused(hf_folder, tmp_path: Path) -> None:
    config = json.loads((hf_folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(WeightsError, match="activation_function='relu'"):
        load_pretrained(tmp_path)


def run_example(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    example = Path(__file__).resolve().parents[1] / "examples" / "pretrained_generate.py"
    return run_offline([sys.executable, str(example), *args], cwd)


def test_pretrained_example_offline_says_how_to_get_the_weights(tmp_path: Path) -> None:
    result = run_example(cwd=tmp_path)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "python -m gpt2_lightning.weights download 124M" in line
    assert "local Hugging Face GPT-2 folder" in line
    assert line.startswith("error: cannot download openai-community/gpt2 from the Hugging Face")


def test_pretrained_example_names_why_a_folder_cannot_be_read(tmp_path: Path) -> None:
    result = run_example(str(tmp_path), cwd=tmp_path)  # a folder, but no config.json in it
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path} has no config.json: not a Hugging Face model")


def test_pretrained_example_generates_from_a_local_folder(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = GPT(
        GPTConfig(vocab_size=50257, context_length=64, emb_dim=16, num_layers=1, num_heads=2)
    )
    model.save_pretrained(tmp_path / "gpt2-local")
    result = run_example(str(tmp_path / "gpt2-local"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello, I'm a language model,")
    assert len(result.stdout) > len("Hello, I'm a language model,") + 10


def test_a_file_that_is_not_a_training_checkpoint_gets_a_reason(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(WeightsError, match=r"checkpoint=.* \(not a PyTorch file\)$"):
        weights.load_checkpoint(text)
    other = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(2)}, other)  # a PyTorch file, but not from training
    with pytest.raises(WeightsError, match=r"\(no hyper_parameters.model and state_dict in it\)"):
        weights.load_checkpoint(other)


def test_a_checkpoint_holding_other_objects_gets_a_reason(tmp_path):
    tensor = tmp_path / "tensor.ckpt"
    torch.save(torch.zeros(3), tensor)  # a tensor, not a dict (was an IndexError traceback)
    with pytest.raises(WeightsError, match=r"\(no hyper_parameters.model and state_dict in it\)"):
        weights.load_checkpoint(tensor)
    namespace = tmp_path / "namespace.ckpt"
    torch.save({"args": __import__("argparse").Namespace(a=1)}, namespace)
    with pytest.raises(WeightsError, match=r"\(Unsupported global: GLOBAL argparse.Namespace"):
        weights.load_checkpoint(namespace)


@pytest.mark.parametrize(
    ("config", "weights_bytes", "message"),
    [
        ("[1]", None, r"config.json holds a list, not a JSON object$"),
        ("{'n_head': 2}", None, r"config.json is not valid JSON \(Expecting property name"),
        ('{"layer_norm_epsilon": "1e-5"}', None, r"layer_norm_epsilon='1e-5': only 1e-05"),
        ("keep", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", r"model.safetensors is not a readable"),
        ("keep", b"", r"model.safetensors is not a readable weights file \(SafetensorError"),
    ],
)
def test_broken_hf_folder_is_named_in_one_line(
    hf_folder, tmp_path: Path, config, weights_bytes, message
) -> None:
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((hf_folder / name).read_bytes())
    if config != "keep":
        (tmp_path / "config.json").write_text(config)
    if weights_bytes is not None:
        (tmp_path / "model.safetensors").write_bytes(weights_bytes)
    with pytest.raises(WeightsError, match=message) as error:
        load_pretrained(tmp_path)
    assert "\n" not in str(error.value)


def test_config_json_that_disagrees_with_the_weights_names_the_tensor(hf_folder, tmp_path):
    config = json.loads((hf_folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": config["n_embd"] * 2}))
    (tmp_path / "model.safetensors").write_bytes((hf_folder / "model.safetensors").read_bytes())
    with pytest.raises(WeightsError, match=r"size mismatch for tok_emb.weight"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_head": 5}))
    with pytest.raises(WeightsError, match=r"describes no valid GPT-2 \(emb_dim=48 .* num_heads=5"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"pytorch_model.bin is not a readable weights file"):
        load_pretrained(tmp_path)
    torch.save([torch.zeros(1)], tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"pytorch_model.bin does not hold a dict of tensors"):
        load_pretrained(tmp_path)


def test_an_empty_source_is_not_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint='' is empty"):
        weights.load_weights("", key="checkpoint")
    with pytest.raises(ValueError, match=r"'' is empty"):
        load_pretrained("")
    with pytest.raises(WeightsError, match="the folder to write is empty"):
        weights._export("unused.ckpt", "", force=True)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_before_replacing_anything(tmp_path):
    target = tmp_path / "hf"
    (target / "model.safetensors").mkdir(parents=True)
    (target / "config.json").write_text("old")
    model = GPT(GPTConfig(vocab_size=64, context_length=8, emb_dim=16, num_layers=1, num_heads=2))
    with pytest.raises(WeightsError, match=r"model.safetensors is a folder"):
        save_pretrained(model, target)
    assert (target / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging folder left


def test_export_errors_name_the_target_and_the_folder_is_not_private(tmp_path):
    model = GPT(GPTConfig(vocab_size=64, context_length=8, emb_dim=16, num_layers=1, num_heads=2))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    ckpt = tmp_path / "small.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"model": model.cfg.to_dict()}}, ckpt)
    (tmp_path / "afile").write_text("")
    with pytest.raises(WeightsError, match=r"^cannot write '.*afile/sub': "):
        weights._export(str(ckpt), str(tmp_path / "afile" / "sub"), force=False)
    with pytest.raises(WeightsError, match=r"is a folder: give a .ckpt file in it, e.g. .*last"):
        weights._export(str(tmp_path), str(tmp_path / "out"), force=False)
    weights._export(str(ckpt), str(tmp_path / "hf"), force=False)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o777 & ~umask  # mkdtemp's is 0700


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_all_get_the_umasks_mode(tmp_path, umask: int) -> None:
    model = GPT(GPTConfig(vocab_size=64, context_length=8, emb_dim=16, num_layers=1, num_heads=2))
    old = os.umask(umask)
    try:
        save_pretrained(model, tmp_path / "hf")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert modes == dict.fromkeys(EXPORTED_FILES, 0o666 & ~umask)  # save_file's alone was 0600


def test_from_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=VOCAB, context_length=16, emb_dim=32, num_layers=2, num_heads=4)
    model = GPT(GPTConfig(**{**cfg.to_dict(), "norm": "rmsnorm"})).eval()  # beyond HF's GPT-2
    save_training_checkpoint(model, tmp_path / "last.ckpt")
    loaded = GPT.from_checkpoint(tmp_path / "last.ckpt").eval()
    assert loaded.cfg == model.cfg
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    idx = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_read_checkpoint_names_the_key_and_says_what_to_give(tmp_path):
    run = tmp_path / "checkpoints"
    run.mkdir()
    with pytest.raises(WeightsError) as error:
        weights.read_checkpoint(run, key="ckpt_path")
    assert str(error.value) == (
        f"ckpt_path={str(run)!r} is a folder: give a .ckpt file in it, e.g. {run / 'last.ckpt'}"
    )
    with pytest.raises(WeightsError) as error:
        weights.read_checkpoint(run / "last.ckpt", key="ckpt_path")
    assert str(error.value) == (
        f"ckpt_path={str(run / 'last.ckpt')!r} does not exist: give a .ckpt written by a "
        "training run, e.g. outputs/<date>/<time>/checkpoints/last.ckpt"
    )
    with zipfile.ZipFile(run / "notes.ckpt", "w") as archive:  # a zip, but not torch.save's
        archive.writestr("notes.txt", "hello")
    with pytest.raises(WeightsError, match=r"^init_from=.* is not a readable Lightning .*\(Run"):
        weights.read_checkpoint(run / "notes.ckpt", key="init_from")


def test_read_checkpoint_gives_the_dict_and_load_checkpoint_names_a_model_that_does_not_fit(
    tmp_path,
):
    model = GPT(GPTConfig(vocab_size=64, context_length=8, emb_dim=16, num_layers=1, num_heads=2))
    save_training_checkpoint(model, tmp_path / "last.ckpt")
    ckpt = weights.read_checkpoint(tmp_path / "last.ckpt")
    assert ckpt["hyper_parameters"]["model"] == model.cfg.to_dict()
    assert torch.equal(ckpt["state_dict"]["model.tok_emb.weight"], model.tok_emb.weight)
    ckpt["hyper_parameters"]["model"]["num_layers"] = 2  # the weights hold one layer
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(WeightsError, match=r"holds a model that GPT cannot load \(RuntimeError: "):
        weights.load_checkpoint(tmp_path / "other.ckpt")
    ckpt["hyper_parameters"]["model"] = {"layers": 2}  # not GPTConfig's fields
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(WeightsError, match=r"holds a model that GPT cannot load \(TypeError: "):
        weights.load_checkpoint(tmp_path / "other.ckpt")
