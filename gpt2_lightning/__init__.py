"""GPT-2 from scratch in PyTorch, trained with Lightning, configured with Hydra."""

from gpt2_lightning.model import GPT, GPTConfig, KVCache
from gpt2_lightning.tokenizer import get_tokenizer

__all__ = ["GPT", "GPTConfig", "KVCache", "generate", "get_tokenizer", "stream"]


def __getattr__(name: str):
    # generate.py is also run as `python -m gpt2_lightning.generate`; importing it here eagerly
    # would make runpy warn that the module was already imported, so it is loaded on first use.
    if name in ("generate", "stream"):
        from gpt2_lightning import generate as generate_module

        return getattr(generate_module, name)
    raise AttributeError(f"module 'gpt2_lightning' has no attribute {name!r}")
