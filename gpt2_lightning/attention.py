"""Attention spelled out step by step: the teaching versions of model.py's MultiHeadAttention.

Read the three classes in order; each adds one idea to the one before.

    SelfAttention              every token looks at every token
    CausalAttention            ... but only at itself and the tokens before it (+ dropout)
    MultiHeadAttentionWrapper  several causal heads side by side, then an output projection

They compute the model's numbers (tests/test_attention.py proves it), only slower and easier to
read. Shapes: B batch, T tokens, d_in/d_out input/output size; one sequence (T, d_in) works too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

Attended = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # context, or (context, weights)


class SelfAttention(nn.Module):
    """One attention head without a mask: each token's output mixes the values of all tokens.

    Every token is projected three ways: a query (what am I looking for?), a key (what do I
    contain?) and a value (what do I pass on?). The score of token i for token j is the dot
    product query_i . key_j; a softmax over j turns token i's scores into weights that sum to 1,
    and token i's output, its context vector, is the weighted sum of the values.

    Scores are divided by sqrt(d_out): a dot product of d_out random terms grows like sqrt(d_out),
    and large scores would push the softmax to a one-hot with vanishing gradients.

    x (B, T, d_in) -> context (B, T, d_out); weights (B, T, T), row i = where token i looks.
    """

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False):
        super().__init__()
        self.query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x: torch.Tensor, return_weights: bool = False) -> Attended:
        queries, keys, values = self.query(x), self.key(x), self.value(x)  # (B, T, d_out) each
        scores = queries @ keys.transpose(-2, -1)  # (B, T, T): scores[b, i, j] = q_i . k_j
        weights = torch.softmax(scores / math.sqrt(keys.size(-1)), dim=-1)  # each row sums to 1
        context = weights @ values  # (B, T, d_out)
        return (context, weights) if return_weights else context


class CausalAttention(SelfAttention):
    """One attention head in which token i sees only tokens 0..i: what a language model needs.

    A model trained to predict the next token must not read it. Setting the scores above the
    diagonal (j > i) to -inf before the softmax gives those positions weight exactly 0, and the
    remaining weights of each row still sum to 1.

    Dropout then zeroes random attention weights during training (scaling the survivors by
    1 / (1 - dropout)), so that no token leans on one particular other token; in eval mode it does
    nothing. The weights returned are those after dropout: the ones the context was built from.

    x (B, T, d_in) with T <= context_length -> context (B, T, d_out); weights (B, T, T).
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float = 0.0,
        qkv_bias: bool = False,
    ):
        super().__init__(d_in, d_out, qkv_bias)  # the same query, key and value projections
        self.context_length = context_length
        self.dropout = nn.Dropout(dropout)
        # True above the diagonal = "future, hide it". A buffer moves with .to(device) like the
        # weights; it is not learned and follows from context_length, so it stays out of state_dict.
        future = torch.ones(context_length, context_length, dtype=torch.bool).triu(diagonal=1)
        self.register_buffer("mask", future, persistent=False)

    def forward(self, x: torch.Tensor, return_weights: bool = False) -> Attended:
        T = x.size(-2)  # (B, T, d_in), or (T, d_in) for one sequence
        if T > self.context_length:
            raise ValueError(f"sequence length {T} exceeds context_length={self.context_length}")
        queries, keys, values = self.query(x), self.key(x), self.value(x)  # (B, T, d_out) each
        scores = queries @ keys.transpose(-2, -1)  # (B, T, T)
        scores = scores.masked_fill(self.mask[:T, :T], float("-inf"))  # exp(-inf) = 0
        weights = torch.softmax(scores / math.sqrt(keys.size(-1)), dim=-1)  # (B, T, T)
        weights = self.dropout(weights)
        context = weights @ values  # (B, T, d_out)
        return (context, weights) if return_weights else context


class MultiHeadAttentionWrapper(nn.Module):
    """num_heads CausalAttention heads side by side, concatenated, then an output projection.

    Each head has its own queries, keys and values of size d_out // num_heads, so it can attend
    to different things (one head to the previous word, another to the subject of the sentence)
    for the cost of one head of size d_out. out_proj then mixes what the heads found.

    model.py's MultiHeadAttention computes exactly this, with the heads' projections fused into
    one matrix and all heads in one batched product instead of a Python loop.

    x (B, T, d_in) -> context (B, T, d_out); weights (B, num_heads, T, T).
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        num_heads: int,
        dropout: float = 0.0,
        qkv_bias: bool = False,
    ):
        super().__init__()
        if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
            raise ValueError(f"num_heads={num_heads!r} is invalid: must be a positive integer")
        if d_out % num_heads != 0:
            raise ValueError(f"d_out={d_out} is not divisible by num_heads={num_heads}")
        head_dim = d_out // num_heads
        self.heads = nn.ModuleList(
            CausalAttention(d_in, head_dim, context_length, dropout, qkv_bias)
            for _ in range(num_heads)
        )
        self.out_proj = nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor, return_weights: bool = False) -> Attended:
        contexts, weights = zip(*(head(x, return_weights=True) for head in self.heads), strict=True)
        context = self.out_proj(torch.cat(contexts, dim=-1))  # (B, T, d_out)
        weights = torch.stack(weights, dim=-3)  # (B, num_heads, T, T)
        return (context, weights) if return_weights else context
