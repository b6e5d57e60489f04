"""First steps with gpt2_lightning: build models, count parameters, tokenize, run and generate.

    python examples/basic_usage.py

Runs in a few seconds on a CPU: the 124M model is only counted (on the meta device), the forward
pass uses the tiny config, and the weights are random (untrained).
"""

from __future__ import annotations

import torch

from gpt2_lightning import GPT, GPTConfig, generate, get_tokenizer

SIZES = ("tiny", "124M")


def parameter_counts() -> None:
    print("== Parameter counts ==")
    for size in SIZES:
        # The meta device gives tensors shapes but no storage: counting 124M parameters this way
        # costs nothing, where building them for real would allocate and initialise ~500 MB.
        with torch.device("meta"):
            model = GPT(GPTConfig.from_name(size))
        count = model.num_parameters()
        mib = count * 4 / 2**20  # fp32: 4 bytes a parameter
        print(f"{size}: {count:,} parameters, {mib:.1f} MiB in fp32")


def tokenize(text: str) -> None:
    print("== Tokenizer ==")
    enc = get_tokenizer()
    ids = enc.encode(text)
    print(f"text: {text!r}")
    print(f"token ids: {ids}")
    print(f"tokens: {[enc.decode([i]) for i in ids]}")
    print(f"decoded: {enc.decode(ids)!r}")


def forward_pass(model: GPT, text: str) -> None:
    print("== Forward pass (tiny, untrained) ==")
    enc = get_tokenizer()
    idx = torch.tensor([enc.encode(text)])  # a batch of one sequence
    with torch.no_grad():
        logits = model(idx)
    print(f"text: {text!r}")
    print(f"input ids shape: {tuple(idx.shape)}")
    print(f"logits shape: {tuple(logits.shape)}")  # one score per vocabulary entry and position
    # Untrained, the guess is often the last input token again: with small random weights the
    # final vector stays close to that token's embedding, and the tied lm_head scores it highest.
    next_id = int(logits[0, -1].argmax())
    print(f"most likely next token: {next_id} {enc.decode([next_id])!r}")


def generation(model: GPT, text: str) -> None:
    print("== Generation (tiny, untrained: expect gibberish) ==")
    enc = get_tokenizer()
    idx = torch.tensor([enc.encode(text)])
    greedy = generate(model, idx, max_new_tokens=8, temperature=0.0)  # always the top token
    # A seeded generator makes sampling repeatable: same seed, same text.
    generator = torch.Generator().manual_seed(0)
    sampled = generate(model, idx, 8, temperature=0.8, top_k=50, top_p=0.95, generator=generator)
    print(f"greedy new ids: {greedy[0, idx.size(1) :].tolist()}")
    print(f"sampled new ids: {sampled[0, idx.size(1) :].tolist()}")
    print(f"sampled text: {enc.decode(sampled[0].tolist())!r}")


def main() -> None:
    torch.manual_seed(123)
    parameter_counts()
    tokenize("hello world")
    model = GPT(GPTConfig.from_name("tiny")).eval()
    forward_pass(model, "Every effort moves you")
    generation(model, "Every effort moves you")


if __name__ == "__main__":
    main()
