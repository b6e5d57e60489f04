"""GPT-2 from scratch in PyTorch, trained with Lightning, configured with Hydra."""

import warnings

# `python -m gpt2_lightning.generate` (or .weights) runs a module this file has already imported,
# and runpy warns that it is in sys.modules. Running it again as __main__ is harmless (they only
# define functions), so the warning is silenced. Importing generate lazily instead would let the
# submodule shadow the generate() function.
warnings.filterwarnings(
    "ignore",
    message=r"'gpt2_lightning\.\w+' found in sys\.modules after import of package",
    category=RuntimeWarning,
)

from gpt2_lightning import weights  # noqa: E402, F401  (adds GPT.from_pretrained and the others)
from gpt2_lightning.generate import generate, stream  # noqa: E402
from gpt2_lightning.model import GPT, GPTConfig, KVCache  # noqa: E402
from gpt2_lightning.tokenizer import get_tokenizer  # noqa: E402

__all__ = ["GPT", "GPTConfig", "KVCache", "generate", "get_tokenizer", "stream"]
