"""The GPT-2 of mars_ref.gpt.model: size, gradients, causality, tied weights, initialisation, sampling."""

import math

import pytest
import torch

from mars_ref.gpt.model import GPT, GPTConfig, preset


def expected_params(c: GPTConfig) -> int:
    """GPT-2's parameter count written out by hand (tied head counted once)."""
    d, L = c.n_embd, c.n_layer
    ln = d * (2 if c.bias else 1)  # weight (+ bias)
    attn = d * 3 * d + (3 * d if c.bias else 0) + d * d + (d if c.bias else 0)
    mlp = d * 4 * d + (4 * d if c.bias else 0) + 4 * d * d + (d if c.bias else 0)
    return c.vocab_size * d + c.block_size * d + L * (2 * ln + attn + mlp) + ln


@pytest.mark.parametrize("bias", [False, True])
def test_gpt2_small_has_124M_parameters(bias):
    config = preset("gpt2-small", bias=bias)
    with torch.device("meta"):  # the real module, without allocating 0.5 GB
        model = GPT(config)
    n = model.num_params()
    assert n == expected_params(config)
    assert n == (124_373_760 if not bias else 124_475_904)
    assert 123e6 < n < 125e6


def test_gpt2_medium_is_355M():
    with torch.device("meta"):
        model = GPT(preset("gpt2-medium"))
    assert 353e6 < model.num_params() < 356e6


def test_unknown_preset_is_an_error():
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("gpt2-gigantic")


def toy(bias=False, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=16, dropout=dropout,
                       bias=bias)
    return GPT(config)


@pytest.mark.parametrize("bias", [False, True])
def test_forward_backward_toy(bias):
    model = toy(bias=bias)
    idx, targets = torch.randint(0, 11, (3, 16)), torch.randint(0, 11, (3, 16))
    logits, loss = model(idx, targets=targets)
    assert logits.shape == (3, 16, 11)
    assert abs(loss.item() - math.log(11)) < 0.1  # initial loss ≈ ln(vocab)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    logits, loss = model(idx)
    assert loss is None


def test_causality_future_tokens_do_not_change_past_logits():
    model = toy().eval()
    idx = torch.randint(0, 11, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 11
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4


def test_embedding_and_head_are_tied():
    model = toy()
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names or "transformer.wte.weight" not in names  # listed once
    idx = torch.randint(0, 11, (2, 8))
    model(idx, targets=idx)[1].backward()
    assert model.transformer.wte.weight.grad is model.lm_head.weight.grad


def test_gpt2_initialisation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=500, n_layer=8, n_head=4, n_embd=256))
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 1e-3
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 1e-3
    residual_std = 0.02 / math.sqrt(2 * 8)
    for block in model.transformer.h:
        assert abs(block.attn.c_proj.weight.std().item() - residual_std) < 5e-4
        assert abs(block.mlp.c_proj.weight.std().item() - residual_std) < 5e-4


def test_dropout_is_active_only_in_training():
    model = toy(dropout=0.5)
    idx = torch.randint(0, 11, (2, 8))
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])


def test_generate_extends_and_crops_context():
    model = toy()
    start = torch.zeros((2, 3), dtype=torch.long)
    out = model.generate(start, max_new_tokens=20, temperature=0.8, top_k=5,
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 23)  # longer than block_size=16: the context was cropped
    assert torch.equal(out[:, :3], start)
    assert int(out.max()) < 11 and model.training


def test_sequence_longer_than_block_is_an_error():
    with pytest.raises(ValueError, match="block_size"):
        toy()(torch.zeros((1, 17), dtype=torch.long))
