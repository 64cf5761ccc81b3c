"""Fast CPU dropout: the same Bernoulli masks and scaling as nn.Dropout, and attention unchanged."""

import json

import pytest
import torch
from torch import nn
from transformers import AutoModel

from eventcoder.dropout import ATTENTION_NAME, FastDropout, _attention, fast_dropout, use_fast_dropout
from eventcoder.model_dir import load_model_dir
from eventcoder.modeling import MultiTaskModel


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_fast_dropout_drops_a_fraction_p_and_rescales_the_rest(p):
    torch.manual_seed(0)
    x = torch.rand(1001, 999) + 0.5  # odd size: the mask is cut from whole 64-bit words
    out = fast_dropout(x, p)
    dropped = out == 0
    assert abs(dropped.float().mean().item() - p) < 0.003
    torch.testing.assert_close(out[~dropped], x[~dropped] / (1 - p))
    # Neighbouring 16-bit slices of one word must be independent draws, not copies.
    pairs = dropped.flatten()[: 1001 * 998].view(-1, 2).float()
    both = (pairs[:, 0] * pairs[:, 1]).mean().item()
    assert abs(both - p * p) < 0.003


def test_fast_dropout_edges_and_bf16():
    x = torch.randn(7, 5, dtype=torch.bfloat16)
    assert torch.equal(fast_dropout(x, 0.0), x)
    assert torch.count_nonzero(fast_dropout(x, 1.0)) == 0
    assert fast_dropout(x, 0.3).dtype == torch.bfloat16


def test_fast_dropout_follows_torch_seed_and_passes_gradients_through_kept_elements():
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(3)
    first = fast_dropout(x, 0.2)
    torch.manual_seed(3)
    second = fast_dropout(x, 0.2)
    assert torch.equal(first, second)
    first.sum().backward()
    torch.testing.assert_close(x.grad, (first != 0).float() / 0.8)


def test_fast_dropout_module_is_plain_dropout_in_eval_mode():
    layer = FastDropout(0.4)
    x = torch.randn(10, 10)
    assert torch.equal(layer.eval()(x), x)
    dropped = (layer.train()(x) == 0).float().mean().item()
    assert 0.2 < dropped < 0.6


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_training_attention_equals_sdpa_when_nothing_is_dropped(mask_kind):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 6, 8, requires_grad=True) for _ in range(3))
    keep = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4], dtype=torch.bool)[:, None, None, :]
    mask = {"bool": keep, "additive": torch.zeros(keep.shape).masked_fill(~keep, -1e9), "none": None}[mask_kind]
    module = nn.Module().train()
    module.is_causal = False  # an encoder's self-attention, as in BERT
    expected, _ = _attention(module, q, k, v, mask, dropout=0.0, scaling=8**-0.5)  # the SDPA branch
    # p below 1/65536 rounds to "drop nothing", so this runs the eager branch with its dropout.
    actual, _ = _attention(module, q, k, v, mask, dropout=1e-9, scaling=8**-0.5)
    assert actual.shape == (3, 6, 2, 8)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_use_fast_dropout_changes_training_not_evaluation_nor_the_saved_model(tiny_encoder, acled_schema, tmp_path):
    torch.manual_seed(0)
    model = MultiTaskModel.from_encoder(str(tiny_encoder), acled_schema, "mean", 0.1).eval()
    ids = torch.randint(1000, 2000, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    before = model(ids, mask)
    swapped = use_fast_dropout(model)
    # embeddings + per layer (attention probabilities, attention output, feed-forward output) + heads
    assert swapped == 1 + 3 * model.encoder.config.num_hidden_layers + 1
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert model.encoder.config._attn_implementation == ATTENTION_NAME
    after = model(ids, mask)
    for name in before:
        torch.testing.assert_close(after[name], before[name])

    model.train()
    logits = model(ids, mask)
    sum(t.sum() for t in logits.values()).backward()
    assert model.encoder.encoder.layer[0].attention.self.query.weight.grad is not None

    model.encoder.save_pretrained(tmp_path / "encoder")
    saved = json.loads((tmp_path / "encoder" / "config.json").read_text())
    assert ATTENTION_NAME not in json.dumps(saved)
    reloaded = AutoModel.from_pretrained(tmp_path / "encoder")
    assert reloaded.config._attn_implementation == "sdpa"


def test_a_trained_model_dir_loads_with_standard_attention(registered_tiny_model):
    model, _, _, _ = load_model_dir(registered_tiny_model["model_dir"])
    assert model.encoder.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, FastDropout) for m in model.modules())


def test_causal_attention_is_left_to_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    module = nn.Module().train()
    module.is_causal = True
    torch.manual_seed(1)
    actual, _ = _attention(module, q, k, v, None, dropout=0.0, scaling=None)
    causal = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(actual, causal)


def test_grouped_query_attention_is_left_to_sdpa():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8)
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    module = nn.Module().train()
    module.is_causal = False
    module.num_key_value_groups = 2  # as transformers' grouped-query attention modules carry it
    actual, _ = _attention(module, q, k, v, None, dropout=1e-9, scaling=None)
    expected = nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(actual, expected)
