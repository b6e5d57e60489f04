"""The teaching attentions compute what the model's fused MultiHeadAttention computes."""

from __future__ import annotations

import pytest
import torch

from gpt2_lightning import GPTConfig
from gpt2_lightning.attention import CausalAttention, MultiHeadAttentionWrapper, SelfAttention
from gpt2_lightning.model import MultiHeadAttention

EMB_DIM, CONTEXT_LENGTH, T = 32, 16, 10


def model_attention(num_heads: int) -> MultiHeadAttention:
    torch.manual_seed(0)
    cfg = GPTConfig(
        context_length=CONTEXT_LENGTH, emb_dim=EMB_DIM, num_layers=1, num_heads=num_heads
    )
    attention = MultiHeadAttention(cfg, layer=0).eval()
    with torch.no_grad():  # the model zero-initialises biases; make them count in the comparison
        for linear in (attention.qkv, attention.out_proj):
            linear.weight.normal_(0.0, 0.3)
            linear.bias.normal_(0.0, 0.3)
    return attention


def copy_head(head: CausalAttention, fused: MultiHeadAttention, index: int) -> None:
    """Give one teaching head the rows of the fused qkv projection that belong to head `index`."""
    head_dim = EMB_DIM // fused.num_heads
    # qkv's output is [queries | keys | values], each EMB_DIM wide and split into heads in order.
    for part, linear in enumerate((head.query, head.key, head.value)):
        rows = slice(part * EMB_DIM + index * head_dim, part * EMB_DIM + (index + 1) * head_dim)
        linear.weight.copy_(fused.qkv.weight[rows])
        linear.bias.copy_(fused.qkv.bias[rows])


def inputs(batch_size: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch_size, T, EMB_DIM)


def test_causal_attention_matches_the_model_with_one_head():
    fused = model_attention(num_heads=1)
    head = CausalAttention(EMB_DIM, EMB_DIM, CONTEXT_LENGTH, qkv_bias=True).eval()
    with torch.no_grad():
        copy_head(head, fused, 0)
        x = inputs()
        # CausalAttention stops before the output projection the model applies.
        difference = fused.out_proj(head(x)) - fused(x)
    assert difference.abs().max().item() < 1e-5


def test_multi_head_wrapper_matches_the_model():
    fused = model_attention(num_heads=4)
    wrapper = MultiHeadAttentionWrapper(
        EMB_DIM, EMB_DIM, CONTEXT_LENGTH, num_heads=4, qkv_bias=True
    ).eval()
    with torch.no_grad():
        for index, head in enumerate(wrapper.heads):
            copy_head(head, fused, index)
        wrapper.out_proj.load_state_dict(fused.out_proj.state_dict())
        x = inputs()
        context, weights = wrapper(x, return_weights=True)
        assert (context - fused(x)).abs().max().item() < 1e-5
    assert weights.shape == (2, 4, T, T)


def self_and_causal() -> tuple[SelfAttention, CausalAttention]:
    torch.manual_seed(0)
    self_attention = SelfAttention(EMB_DIM, 8)
    causal = CausalAttention(EMB_DIM, 8, CONTEXT_LENGTH)
    causal.load_state_dict(self_attention.state_dict())
    return self_attention, causal


def test_mask_changes_every_position_but_the_last():
    self_attention, causal = self_and_causal()
    x = inputs()
    with torch.no_grad():
        difference = (self_attention(x) - causal(x)).abs().amax(dim=-1)  # (B, T)
    # The last token may look at every token anyway; every earlier one loses its future.
    assert difference[:, -1].max().item() < 1e-6
    assert difference[:, :-1].min().item() > 1e-4


def test_causal_weights_are_the_self_weights_restricted_to_the_past():
    self_attention, causal = self_and_causal()
    x = inputs()
    with torch.no_grad():
        _, self_weights = self_attention(x, return_weights=True)
        _, causal_weights = causal(x, return_weights=True)
    future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    assert torch.all(causal_weights[:, future] == 0.0)
    assert self_weights[:, future].min().item() > 0.0
    for weights in (self_weights, causal_weights):
        assert (weights.sum(dim=-1) - 1.0).abs().max().item() < 1e-6
    # Masking before the softmax = keeping the past's weights and renormalising them.
    past = self_weights.masked_fill(future, 0.0)
    renormalised = past / past.sum(dim=-1, keepdim=True)
    assert (causal_weights - renormalised).abs().max().item() < 1e-6
    assert torch.equal(causal_weights[:, -1], self_weights[:, -1])


def test_dropout_acts_on_the_weights_in_training_only():
    torch.manual_seed(0)
    plain = CausalAttention(EMB_DIM, 8, CONTEXT_LENGTH)
    dropped = CausalAttention(EMB_DIM, 8, CONTEXT_LENGTH, dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    x = inputs()
    with torch.no_grad():
        _, reference = plain(x, return_weights=True)
        _, train_weights = dropped.train()(x, return_weights=True)
        eval_context, eval_weights = dropped.eval()(x, return_weights=True)
        assert torch.equal(eval_context, plain(x))
    assert torch.equal(eval_weights, reference)
    past = ~torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    kept = train_weights[:, past] != 0.0
    # About half of the 55 visible weights of each matrix survive, each doubled by 1 / (1 - 0.5).
    assert 0.3 < kept.float().mean().item() < 0.7
    assert torch.allclose(train_weights[:, past][kept], 2.0 * reference[:, past][kept])


def test_wrapper_refuses_d_out_not_divisible_by_num_heads():
    with pytest.raises(ValueError, match=r"d_out=10 .*num_heads=4"):
        MultiHeadAttentionWrapper(8, 10, CONTEXT_LENGTH, num_heads=4)


def test_causal_attention_refuses_input_longer_than_its_context():
    causal = CausalAttention(EMB_DIM, 8, context_length=4)
    with pytest.raises(ValueError, match=r"sequence length 10 exceeds context_length=4"):
        causal(inputs())


@pytest.mark.parametrize("num_heads", [0, -2, 2.0])
def test_wrapper_refuses_a_head_count_that_is_not_positive(num_heads):
    with pytest.raises(
        ValueError, match=rf"num_heads={num_heads!r} is invalid: must be a positive"
    ):
        MultiHeadAttentionWrapper(8, 8, CONTEXT_LENGTH, num_heads=num_heads)


def test_one_sequence_without_a_batch_dimension_gives_the_batched_result():
    torch.manual_seed(0)
    x = inputs(batch_size=1)
    for attention in (
        SelfAttention(EMB_DIM, 8),
        CausalAttention(EMB_DIM, 8, CONTEXT_LENGTH),
        MultiHeadAttentionWrapper(EMB_DIM, 8, CONTEXT_LENGTH, num_heads=2),
    ):
        context, weights = attention(x[0], return_weights=True)  # (T, d_in)
        batched_context, batched_weights = attention(x, return_weights=True)
        assert torch.allclose(context, batched_context[0], atol=1e-6)
        assert torch.allclose(weights, batched_weights[0], atol=1e-6)
