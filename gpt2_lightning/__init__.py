"""GPT-2 from scratch in PyTorch, trained with Lightning, configured with Hydra."""

import warnings

# `python -m gpt2_lightning.generate` (or .weights) runs a module that this file has already
# imported, for the generate() and stream() functions below; runpy then warns that the module is
# in sys.modules. Running it again as __main__ is harmless here (these modules only define
# functions), so that warning is silenced. Importing lazily instead would let the submodule
# shadow the generate() function.
warnings.filterwarnings(
    "ignore",
    message=r"'gpt2_lightning\.\w+' found in sys\.modules after import of package",
    category=RuntimeWarning,
)

from gpt2_lightning.generate import generate, stream  # noqa: E402
from gpt2_lightning.model import GPT, GPTConfig, KVCache  # noqa: E402
from gpt2_lightning.tokenizer import get_tokenizer  # noqa: E402

__all__ = ["GPT", "GPTConfig", "KVCache", "generate", "get_tokenizer", "stream"]
