"""Weights in and out of GPT: the official ones, Hugging Face folders, training checkpoints.

OpenAI's weights are on the Hugging Face hub in transformers' GPT2LMHeadModel layout: other names,
and Conv1D weights stored (in, out), the transpose of nn.Linear's. This module maps both ways.

    python -m gpt2_lightning.weights download 124M        # fetch into the hub cache, print the path
    python -m gpt2_lightning.weights export <ckpt> <dir>  # a checkpoint as an HF folder + tokenizer
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2_lightning.checks import is_number
from gpt2_lightning.files import umask_mode
from gpt2_lightning.model import ALIASES, GPT, GPTConfig
from gpt2_lightning.tokenizer import HF_SHADOWING_FILE, HF_TOKENIZER_FILES, write_hf_tokenizer

# The official sizes (no "tiny": it has no released weights) and the hub repository of each.
REPOS = {
    "124M": "openai-community/gpt2",
    "355M": "openai-community/gpt2-medium",
    "774M": "openai-community/gpt2-large",
    "1558M": "openai-community/gpt2-xl",
}
OFFICIAL_SIZES = (*REPOS, *ALIASES)  # every name load_pretrained downloads
VALID_SIZES = ", ".join(OFFICIAL_SIZES)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LEGACY_WEIGHTS_FILE = "pytorch_model.bin"
GENERATION_FILE = "generation_config.json"
EXPORTED_FILES = (CONFIG_FILE, GENERATION_FILE, WEIGHTS_FILE, *HF_TOKENIZER_FILES)
INDEX_SUFFIX = ".index.json"  # model.safetensors.index.json: the shards of a large model
EOS_ID = 50256  # <|endoftext|>, GPT-2's only special token
LAYER_NORM_EPS = 1e-5  # our LayerNorm's, fixed: a config asking for another cannot be matched


class WeightsError(RuntimeError):
    """Weights that cannot be fetched, read or mapped onto our model."""


def download(size: str) -> Path:
    """Fetch an official size into the Hugging Face cache; the folder holding its two files."""
    repo = REPOS.get(ALIASES.get(size, size))
    if repo is None:
        raise ValueError(f"unknown model size {size!r}: valid sizes are {VALID_SIZES}")
    try:
        hf_hub_download(repo, CONFIG_FILE)
        return Path(hf_hub_download(repo, WEIGHTS_FILE)).parent
    except OSError as error:  # the hub's connection, offline and HTTP errors are all OSErrors
        raise WeightsError(
            f"cannot download {repo} from the Hugging Face hub ({_first_line(error)}): on a "
            f"machine with internet run `python -m gpt2_lightning.weights download {size}`, or "
            f"pass a local folder holding {CONFIG_FILE} and {WEIGHTS_FILE} instead of the size name"
        ) from error


def load_pretrained(name_or_path: str | Path) -> GPT:
    """A GPT holding official weights, by size name ('124M', 'gpt2', ...) or HF-format folder."""
    if not str(name_or_path).strip():  # Path("") is the current folder
        raise ValueError("'' is empty: pass an official size name or a folder")
    if Path(name_or_path).is_dir():  # as in transformers, a folder wins over a size name
        return load_folder(name_or_path)
    if str(name_or_path) in OFFICIAL_SIZES:
        return load_folder(download(str(name_or_path)))
    raise ValueError(
        f"{str(name_or_path)!r} is neither an official size nor an existing folder: valid sizes "
        f"are {VALID_SIZES}, or pass a folder holding {CONFIG_FILE} and {WEIGHTS_FILE}"
    )


def load_folder(folder: str | Path) -> GPT:
    """A GPT from a Hugging Face GPT-2 folder: config.json and model.safetensors (.bin, shards)."""
    config_path = Path(folder) / CONFIG_FILE
    if not config_path.is_file():
        raise WeightsError(f"{folder} has no {CONFIG_FILE}: not a Hugging Face model folder")
    try:
        hf = json.loads(config_path.read_text())
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise WeightsError(f"{config_path} is not valid JSON ({_first_line(error)})") from error
    if not isinstance(hf, dict):
        raise WeightsError(f"{config_path} holds a {type(hf).__name__}, not a JSON object")
    cfg = config_from_hf(hf)
    hf_state = {}
    for weights in weights_files(Path(folder)):
        hf_state.update(read_weights(weights))
    state = state_from_hf(hf_state, cfg.num_layers)
    # On the meta device: a random init of what is overwritten at once would take seconds.
    with torch.device("meta"):
        model = GPT(cfg)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as error:  # shapes that disagree with config.json
        raise WeightsError(f"{folder}: {_first_line(error)}") from error
    model.lm_head.weight = model.tok_emb.weight  # assign gave each name its own Parameter: re-tie
    return model


def weights_files(folder: Path) -> list[Path]:
    """A folder's weights files in transformers' order: safetensors (or shards), then .bin."""
    for name in (WEIGHTS_FILE, LEGACY_WEIGHTS_FILE):
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}{INDEX_SUFFIX}"
        if index.is_file():
            return _shards(index)
    raise WeightsError(
        f"{folder} holds no {WEIGHTS_FILE} or {LEGACY_WEIGHTS_FILE}, nor shards of them"
    )


def _shards(index: Path) -> list[Path]:
    """The shard files an index names ({"weight_map": {tensor name: file name}}), each once."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (ValueError, AttributeError) as error:  # not JSON, or JSON that is not an object
        raise WeightsError(f"{index} is not a JSON object ({_first_line(error)})") from error
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f'{index} has no "weight_map" object naming the shard files')
    shards = []
    for name in dict.fromkeys(weight_map.values()):  # in order, without repeats
        # A plain file name next to the index: a path could read files outside the folder.
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise WeightsError(f"{index} names {name!r} as a shard: not a file name")
        if not (index.parent / name).is_file():
            raise WeightsError(f"{index} names the shard {name}, which is not in the folder")
        shards.append(index.parent / name)
    return shards


def read_weights(weights: Path) -> dict[str, torch.Tensor]:
    """The tensors of one .safetensors or pickled .bin file, with one clear error if not."""
    try:
        if weights.suffix == ".safetensors":
            hf_state = load_file(weights)
        else:
            hf_state = torch.load(weights, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        reason = f"{type(error).__name__}: {_first_line(error)}"
        raise WeightsError(f"{weights} is not a readable weights file ({reason})") from error
    if not isinstance(hf_state, dict) or any(not torch.is_tensor(v) for v in hf_state.values()):
        raise WeightsError(f"{weights} does not hold a dict of tensors")
    return hf_state


def config_from_hf(hf: dict) -> GPTConfig:
    """Our GPTConfig for a transformers GPT2Config dict; refuses what GPT-2 as we build it lacks."""
    eps = hf.get("layer_norm_epsilon", LAYER_NORM_EPS)
    eps_ok = is_number(eps) and math.isclose(eps, LAYER_NORM_EPS)
    checks = {
        "model_type": (hf.get("model_type", "gpt2") == "gpt2", "gpt2"),
        "activation_function": (
            hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
            "gelu_new (GELU, tanh form)",
        ),
        "layer_norm_epsilon": (eps_ok, LAYER_NORM_EPS),
        "n_inner": (hf.get("n_inner") in (None, 4 * hf.get("n_embd", 0)), "null or 4 * n_embd"),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (not hf.get("scale_attn_by_inverse_layer_idx"), False),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), True),
    }
    for key, (ok, expected) in checks.items():
        if not ok:
            raise WeightsError(f"config.json has {key}={hf.get(key)!r}: only {expected} works")
    try:
        return GPTConfig(
            vocab_size=hf["vocab_size"],
            context_length=hf["n_positions"],
            emb_dim=hf["n_embd"],
            num_layers=hf["n_layer"],
            num_heads=hf["n_head"],
            dropout=0.0,  # the released weights are for inference; training sets its own
        )
    except KeyError as error:
        raise WeightsError(f"config.json lacks {error.args[0]!r}") from error
    except ValueError as error:  # named as GPTConfig's fields: n_head is num_heads, ...
        raise WeightsError(f"config.json describes no valid GPT-2 ({error})") from error


def config_to_hf(cfg: GPTConfig) -> dict:
    """A transformers GPT2Config dict (config.json) describing cfg."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LAYER_NORM_EPS,
        **dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop"), cfg.dropout),
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        # <|endoftext|> when the vocabulary has it; transformers warns about an id out of range.
        "bos_token_id": EOS_ID if cfg.vocab_size > EOS_ID else None,
        "eos_token_id": EOS_ID if cfg.vocab_size > EOS_ID else None,
        "tie_word_embeddings": True,
    }


def name_map(num_layers: int) -> dict[str, tuple[str, bool]]:
    """Our parameter name -> (its Hugging Face name without 'transformer.', transposed?)."""
    names = {
        "tok_emb.weight": ("wte.weight", False),
        "pos_emb.weight": ("wpe.weight", False),
        "final_norm.weight": ("ln_f.weight", False),
        "final_norm.bias": ("ln_f.bias", False),
    }
    layer_parts = {
        "norm1": ("ln_1", False),
        "attn.qkv": ("attn.c_attn", True),
        "attn.out_proj": ("attn.c_proj", True),
        "norm2": ("ln_2", False),
        "ff.fc": ("mlp.c_fc", True),
        "ff.proj": ("mlp.c_proj", True),
    }
    for layer in range(num_layers):
        for ours, (theirs, is_conv1d) in layer_parts.items():
            names[f"blocks.{layer}.{ours}.weight"] = (f"h.{layer}.{theirs}.weight", is_conv1d)
            names[f"blocks.{layer}.{ours}.bias"] = (f"h.{layer}.{theirs}.bias", False)
    return names


def state_from_hf(hf_state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Our state dict from a Hugging Face GPT-2 one (with or without the 'transformer.' prefix)."""
    prefix = "transformer."
    hf_state = {k.removeprefix(prefix): v for k, v in hf_state.items()}
    # attn.bias / attn.masked_bias are causal-mask buffers of old transformers versions, and
    # lm_head.weight is the tied copy of wte: none of them carries a weight of its own.
    ignored = {k for k in hf_state if k.endswith(("attn.bias", "attn.masked_bias"))}
    ignored.add("lm_head.weight")
    names = name_map(num_layers)
    missing = [theirs for theirs, _ in names.values() if theirs not in hf_state]
    unexpected = sorted(hf_state.keys() - ignored - {theirs for theirs, _ in names.values()})
    if missing or unexpected:
        raise WeightsError(
            f"the weights do not fit a {num_layers}-layer GPT-2: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    state = {}
    for ours, (theirs, is_conv1d) in names.items():
        # float32 whatever the file holds: the dtype training and the KV cache start from.
        tensor = hf_state[theirs].float()
        state[ours] = tensor.t().contiguous() if is_conv1d else tensor
    state["lm_head.weight"] = state["tok_emb.weight"]
    return state


def state_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """The Hugging Face GPT2LMHeadModel state dict of our model (the tied lm_head left out)."""
    state = model.state_dict()
    hf_state = {}
    for ours, (theirs, is_conv1d) in name_map(model.cfg.num_layers).items():
        tensor = state[ours].detach().cpu()
        hf_state[f"transformer.{theirs}"] = (tensor.t() if is_conv1d else tensor).contiguous()
    return hf_state


def save_pretrained(model: GPT, directory: str | Path) -> None:
    """Write the folder transformers' GPT2LMHeadModel and AutoTokenizer load (EXPORTED_FILES)."""
    cfg = model.cfg
    if cfg.norm != "layernorm":
        raise ValueError(f"norm={cfg.norm!r} cannot be exported: GPT-2 has LayerNorm only")
    if not cfg.qkv_bias:
        raise ValueError("qkv_bias=False cannot be exported: GPT-2's c_attn always has a bias")
    directory = Path(directory)
    for name in EXPORTED_FILES:  # checked before anything is replaced
        if (directory / name).is_dir():
            raise WeightsError(f"{directory / name} is a folder: cannot write the {name} there")
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Written next to the target and renamed into place, so a crash never leaves half a folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        staging.chmod(umask_mode(0o777))  # mkdtemp's folder is private (0700); a model's is not
        hf = config_to_hf(cfg)
        (staging / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
        # transformers' generate() stops at <|endoftext|> by it; rewritten, so none goes stale.
        generation = {k: hf[k] for k in ("bos_token_id", "eos_token_id")}
        (staging / GENERATION_FILE).write_text(json.dumps(generation, indent=2) + "\n")
        save_file(state_to_hf(model), staging / WEIGHTS_FILE, metadata={"format": "pt"})
        (staging / WEIGHTS_FILE).chmod(umask_mode(0o666))  # save_file's is private (0600)
        write_hf_tokenizer(staging, cfg.context_length)
        if directory.exists():
            for name in EXPORTED_FILES:
                os.replace(staging / name, directory / name)
            (directory / HF_SHADOWING_FILE).unlink(missing_ok=True)
        else:
            staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_checkpoint(path: str | Path, key: str = "checkpoint") -> dict:
    """The dict of a Lightning .ckpt written by training (tensors memory-mapped, on the CPU)."""
    named, path = f"{key}={str(path)!r}", Path(path)
    if path.is_dir():
        raise WeightsError(
            f"{named} is a folder: give a .ckpt file in it, e.g. {path / 'last.ckpt'}"
        )
    if not path.is_file():
        raise WeightsError(
            f"{named} does not exist: give a .ckpt written by a training run, e.g. "
            "outputs/<date>/<time>/checkpoints/last.ckpt"
        )
    unreadable = f"{named} is not a readable Lightning checkpoint"
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise WeightsError(f"{unreadable} (not a PyTorch file)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # a damaged file can fail in any layer of the unpickler
        unsupported = re.search(r"Unsupported global: [^\n]*", str(error))
        if unsupported:  # a PyTorch file holding objects that weights_only refuses to build
            reason = unsupported.group()
        elif isinstance(error, pickle.UnpicklingError):
            # Its own message is a paragraph about weights_only, which is not the point here.
            reason = "not a PyTorch file"
        else:
            reason = f"{type(error).__name__}: {_first_line(error)}"
        raise WeightsError(f"{unreadable} ({reason})") from error
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    has_state = isinstance(hparams, dict) and isinstance(ckpt.get("state_dict"), dict)
    if not has_state or "model" not in hparams:
        raise WeightsError(f"{unreadable} (no hyper_parameters.model and state_dict in it)")
    return ckpt


def load_checkpoint(path: str | Path, key: str = "checkpoint") -> GPT:
    """The model from a Lightning checkpoint written by training, with one clear error if not."""
    ckpt = read_checkpoint(path, key)
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        model = GPT(GPTConfig(**ckpt["hyper_parameters"]["model"]))
        model.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as error:  # other fields, values or shapes
        raise WeightsError(
            f"{key}={str(path)!r} holds a model that GPT cannot load "
            f"({type(error).__name__}: {_first_line(error)})"
        ) from error
    return model


def load_weights(source: str, key: str = "init_from") -> GPT:
    """A model from a Lightning .ckpt file, a Hugging Face folder or an official size name."""
    if not str(source).strip():  # Path("") is the current folder
        raise ValueError(f"{key}={source!r} is empty: pass a .ckpt, a folder or a size name")
    path = Path(source)
    if path.is_file():
        return load_checkpoint(path, key)
    if path.is_dir() or source in OFFICIAL_SIZES:
        return load_pretrained(source)
    raise ValueError(
        f"{key}={source!r} is neither a file, a folder nor an official size: pass a "
        f"Lightning .ckpt, a Hugging Face folder or one of {VALID_SIZES}"
    )


def _first_line(error: BaseException) -> str:
    """The reason in one line; a heading ending in ':' keeps the line after it (which tensor)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return lines[0] if lines else type(error).__name__


# The model's loading and saving methods (model.py imports only torch).
GPT.from_pretrained = staticmethod(load_pretrained)
GPT.save_pretrained = save_pretrained
GPT.from_checkpoint = staticmethod(load_checkpoint)


def _export(checkpoint: str, directory: str, force: bool) -> None:
    if not directory.strip():  # Path("") is the current folder
        raise WeightsError("the folder to write is empty: pass its path")
    target = Path(directory)
    if target.is_dir() and any(target.iterdir()) and not force:
        raise WeightsError(f"{directory!r} exists and is not empty: choose another or add --force")
    model = load_checkpoint(checkpoint)
    try:
        save_pretrained(model, target)
    except OSError as error:  # a parent that is a file, a read-only place, a full disk, ...
        raise WeightsError(f"cannot write {directory!r}: {error.strerror}") from error
    print(target)


def main(argv: list[str] | None = None) -> None:
    """`python -m gpt2_lightning.weights download <size> | export <ckpt> <dir> [--force]`."""
    parser = argparse.ArgumentParser(
        prog="python -m gpt2_lightning.weights",
        description="Official GPT-2 weights: download them, or export a checkpoint as them.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="fetch an official size, print its cache folder")
    fetch.add_argument("size", help=VALID_SIZES)
    export = commands.add_parser("export", help="write a Lightning checkpoint as an HF folder")
    export.add_argument("checkpoint", help="a .ckpt written by gpt2_lightning.train")
    export.add_argument("directory", help="the Hugging Face folder to write")
    export.add_argument("--force", action="store_true", help="write into a non-empty folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            print(download(args.size))
        else:
            _export(args.checkpoint, args.directory, args.force)
    except (ValueError, OSError, WeightsError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
