"""The three teaching attentions of gpt2_lightning.attention on one short sentence.

    python examples/attention_demo.py                        # prints every step
    python examples/attention_demo.py --plot attention.png   # and saves the weights as heat-maps

Prints the shapes at each step and the attention weights: self-attention lets every token look
at every other, causal attention hides the future (zeros above the diagonal), dropout zeroes
random weights in training, and several heads each learn their own pattern. Seeded: the output
is the same on every run.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

from gpt2_lightning import get_tokenizer
from gpt2_lightning.attention import CausalAttention, MultiHeadAttentionWrapper, SelfAttention

TEXT = "Your journey starts with one step"
D_IN, D_OUT = 3, 2  # tiny on purpose, so that every number can be read


def print_weights(title: str, weights: torch.Tensor, labels: list[str]) -> None:
    """A (T, T) weight matrix as a table: row i = query token i, column j = key token j."""
    print(f"{title} (rows: queries, columns: keys):")
    print(" " * 10 + "".join(f"{label:>9}" for label in labels))
    for label, row in zip(labels, weights.tolist(), strict=True):
        print(f"{label:<10}" + "".join(f"{value:9.4f}" for value in row))
    print(f"row sums: {[round(s, 4) for s in weights.sum(dim=-1).tolist()]}")


def plot_weights(path: Path, panels: dict[str, torch.Tensor], labels: list[str]) -> None:
    """The (T, T) weight matrices side by side as heat-maps; masked (future) cells in grey."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.6), dpi=100)
    future = torch.ones(len(labels), len(labels), dtype=torch.bool).triu(diagonal=1)
    for ax, (title, weights) in zip(axes, panels.items(), strict=True):
        masked = "causal" in title or "head" in title
        shown = weights.masked_fill(future, float("nan")) if masked else weights
        ax.set_facecolor("#d9d9d9")  # NaN cells are not drawn: the mask shows as grey
        ax.imshow(shown, cmap="viridis", vmin=0, vmax=1)
        for (i, j), value in zip(
            torch.cartesian_prod(*(torch.arange(len(labels)),) * 2).tolist(),
            shown.flatten().tolist(),
            strict=True,
        ):
            if not math.isnan(value):
                color = "black" if value > 0.5 else "white"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("key (attended to)", fontsize=8)
    axes[0].set_ylabel("query (attending)", fontsize=8)
    figure.suptitle(f"attention weights on {TEXT!r} (grey: masked, the future)", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)
    print(f"heat-maps saved: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", type=Path, help="save the attention weights as a PNG here")
    args = parser.parse_args()
    torch.manual_seed(123)
    enc = get_tokenizer()
    ids = enc.encode(TEXT)
    labels = [enc.decode([i]).strip() for i in ids]
    T = len(ids)

    print("== Input ==")
    print(f"text: {TEXT!r}")
    print(f"token ids: {ids}")
    # A learned embedding table in a real model; random here, since only the shapes matter.
    embedding = nn.Embedding(enc.n_vocab, D_IN)
    with torch.no_grad():
        x = embedding(torch.tensor([ids]))
    print(f"embeddings x: {tuple(x.shape)}  (batch, tokens, d_in)")

    print("\n== 1. SelfAttention: one head, no mask ==")
    self_attention = SelfAttention(D_IN, D_OUT)
    with torch.no_grad():
        queries, keys, values = (
            self_attention.query(x),
            self_attention.key(x),
            self_attention.value(x),
        )
        print(f"queries, keys, values: {tuple(queries.shape)} each  (batch, tokens, d_out)")
        scores = queries @ keys.transpose(-2, -1)
        print(f"scores = queries @ keys^T: {tuple(scores.shape)}  (batch, tokens, tokens)")
        weights = torch.softmax(scores / math.sqrt(D_OUT), dim=-1)
        print(f"weights = softmax(scores / sqrt({D_OUT})): {tuple(weights.shape)}")
        context = weights @ values
        print(f"context = weights @ values: {tuple(context.shape)}  (batch, tokens, d_out)")
        module_context, self_weights = self_attention(x, return_weights=True)
    print(f"the module computes the same: {torch.allclose(context, module_context)}")
    print_weights("self-attention weights", self_weights[0], labels)
    above = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    print(f"weight above the diagonal (looking ahead): {self_weights[0][above].sum().item():.4f}")

    print("\n== 2. CausalAttention: the same weights, future masked with -inf ==")
    causal = CausalAttention(D_IN, D_OUT, context_length=T)
    causal.load_state_dict(self_attention.state_dict())
    with torch.no_grad():
        causal_context, causal_weights = causal(x, return_weights=True)
    print(f"context: {tuple(causal_context.shape)}, weights: {tuple(causal_weights.shape)}")
    print_weights("causal attention weights", causal_weights[0], labels)
    print(f"largest weight above the diagonal: {causal_weights[0][above].max().item():.4f}")
    # The last token sees every token either way, so only its row (and output) is unchanged.
    same_last = torch.allclose(causal_context[0, -1], module_context[0, -1])
    print(f"last token's context unchanged by the mask: {same_last}")

    print("\n== 3. Dropout on the attention weights (p=0.5) ==")
    dropped = CausalAttention(D_IN, D_OUT, context_length=T, dropout=0.5)
    dropped.load_state_dict(self_attention.state_dict())
    with torch.no_grad():
        _, train_weights = dropped.train()(x, return_weights=True)
        _, eval_weights = dropped.eval()(x, return_weights=True)
    print_weights("train-mode weights", train_weights[0], labels)
    # Survivors are scaled by 1 / (1 - p) so that each weight's expected value is unchanged.
    print("new zeros on or below the diagonal: dropped; survivors doubled, rows no longer sum to 1")
    print(f"eval mode is dropout-free: {torch.equal(eval_weights, causal_weights)}")

    print("\n== 4. MultiHeadAttentionWrapper: 2 causal heads, concatenated, out_proj ==")
    multi_head = MultiHeadAttentionWrapper(D_IN, 2 * D_OUT, context_length=T, num_heads=2)
    with torch.no_grad():
        multi_context, multi_weights = multi_head(x, return_weights=True)
    print(f"weights: {tuple(multi_weights.shape)}  (batch, heads, tokens, tokens)")
    for head in range(multi_weights.size(1)):
        print_weights(f"head {head} weights", multi_weights[0, head], labels)
    print(f"context: {tuple(multi_context.shape)}  (batch, tokens, heads * head size)")

    if args.plot:
        panels = {
            "self-attention": self_weights[0],
            "causal attention": causal_weights[0],
            **{f"multi-head: head {h} of 2": multi_weights[0, h] for h in range(2)},
        }
        plot_weights(args.plot, panels, labels)


if __name__ == "__main__":
    main()
