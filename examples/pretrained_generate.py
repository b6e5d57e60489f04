"""Text from OpenAI's GPT-2 (124M): load the official weights, sample with top-k and top-p.

    python examples/pretrained_generate.py                  # downloads ~500 MB once, then cached
    python examples/pretrained_generate.py path/to/gpt2     # a local Hugging Face GPT-2 folder

On a machine without internet, fetch the weights elsewhere with
`python -m gpt2_lightning.weights download 124M` and copy the folder it prints.
"""

from __future__ import annotations

import sys

import torch

from gpt2_lightning import GPT, generate, get_tokenizer
from gpt2_lightning.weights import WeightsError

PROMPT = "Hello, I'm a language model,"


def main() -> None:
    source = sys.argv[1] if len(sys.argv) > 1 else "124M"
    try:
        model = GPT.from_pretrained(source)
    except (WeightsError, ValueError) as error:  # the library's one line says what went wrong
        print(
            f"error: {error} (to get the weights: `python -m gpt2_lightning.weights download "
            "124M` on a machine with internet, then pass the folder it prints as a local Hugging "
            "Face GPT-2 folder: python examples/pretrained_generate.py <folder>)",
            file=sys.stderr,
        )
        sys.exit(1)

    tokenizer = get_tokenizer()
    idx = torch.tensor([tokenizer.encode(PROMPT)])
    generator = torch.Generator().manual_seed(42)
    # top_k=50 cuts the long tail of unlikely tokens; top_p=0.95 then keeps the smallest set of
    # those that holds 95% of the probability, so a confident step has fewer candidates.
    out = generate(
        model,
        idx,
        max_new_tokens=40,
        temperature=0.8,
        top_k=50,
        top_p=0.95,
        eos_id=tokenizer.eot_token,
        generator=generator,
    )
    print(tokenizer.decode(out[0].tolist()))


if __name__ == "__main__":
    main()
