"""The generate command line: stream a sample from a checkpoint, an official size or an HF folder.

python -m gpt2_lightning.generate checkpoint=124M prompt="Hello, I'm a language model,"
"""

from __future__ import annotations

import codecs
import sys

import hydra
import torch
from omegaconf import DictConfig

from gpt2_lightning.checks import is_integer
from gpt2_lightning.cli import CONF, check_command_line, one_line_errors, torch_device
from gpt2_lightning.generate import check_sampling, stream
from gpt2_lightning.tokenizer import get_tokenizer
from gpt2_lightning.weights import load_weights

# The one-token steps' dtype; null (the default) or float32: the model's own
DTYPES = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _run(cfg: DictConfig) -> None:
    # Cheap arguments first, so a typo fails at once rather than after loading the weights.
    check_sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    num_samples, seed = cfg.num_samples, cfg.seed
    if not is_integer(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} is invalid: must be an integer >= 1")
    if seed is not None and (not is_integer(seed) or not -(2**63) <= seed < 2**64):
        raise ValueError(
            f"seed={seed!r} is invalid: must be an integer in [-2**63, 2**64), or null for a "
            "random one"
        )
    if not isinstance(cfg.prompt, str):  # prompt=1e3 or prompt=null: Hydra read a number
        raise ValueError(
            f"prompt={cfg.prompt!r} is not text: quote it for Hydra, e.g. 'prompt=\"1e3\"'"
        )
    device = torch_device(str(cfg.device))
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r} is invalid: use null (float32), bfloat16 or float16")
    dtype = DTYPES.get(cfg.dtype)
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
    options = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, eos_id=eos_id)

    for sample in range(num_samples):
        if num_samples > 1:
            print(f"--- sample {sample + 1} of {num_samples} ---")
        print(cfg.prompt, end="", flush=True)
        # A character may span several tokens: the decoder holds its first bytes back until the
        # last arrives, rather than printing a replacement mark.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tokens = stream(model, idx, cfg.max_new_tokens, **options, generator=generator, dtype=dtype)
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


# An absolute path: run through generate.py's shim, this module is not __main__, and Hydra would
# look for the configs as a Python package (conf/ has no __init__.py).
@hydra.main(version_base=None, config_path=str(CONF), config_name="generate")
@one_line_errors
def main(cfg: DictConfig) -> None:
    """`python -m gpt2_lightning.generate checkpoint=... prompt=...`: stream text to stdout."""
    _run(cfg)


def run() -> None:
    """The command, its line checked before Hydra starts."""
    check_command_line("generate", sys.argv[1:])
    main()


if __name__ == "__main__":
    run()
