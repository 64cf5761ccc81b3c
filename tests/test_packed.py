"""Packed (padding-free) inference: the attention kernel, packing, and the packed forward pass."""

import numpy as np
import pytest
import torch
from conftest import tiny_model
from transformers import AutoTokenizer, BertConfig, BertModel, DistilBertConfig, DistilBertModel

from eventcoder import cpu_kernels
from eventcoder.batching import pad_batch, tokenize
from eventcoder.cpu_kernels import amx_available, build_kernel, kernel_path, load_kernel, varlen_attention
from eventcoder.errors import ConfigError
from eventcoder.inference import Predictor, quantize_int8
from eventcoder.modeling import MultiTaskModel
from eventcoder.packed_encoder import (
    FILLER_SENTENCE,
    PackedMultiTaskModel,
    fused_up_projection_support,
    pack,
    packing_support,
    token_budget_batches,
)
from eventcoder.runtime import Runtime

CPU = Runtime(device=torch.device("cpu"), bf16=False)
# Lengths crossing the kernel's blocks: 16 keys, 4 queries.
LENGTHS = [1, 3, 4, 5, 16, 17, 33, 70]
TEXTS = [
    "Soldiers clashed with rebels near Gao.",
    "Hundreds marched peacefully through the capital on Friday, waving flags and chanting.",
    "It rained.",
    "Gunmen attacked a convoy near Kidal on Tuesday, killing four soldiers and wounding two, the army said.",
    "Police fired tear gas.",
]


@pytest.fixture(scope="module", autouse=True)
def kernel():
    reason = load_kernel()
    assert reason is None, reason


def _reference(q, k, v, lengths, heads):
    """Per-sentence softmax attention in float64."""
    out, start = [], 0
    for length in lengths:
        rows = slice(start, start + length)
        split = [t[rows].double().view(length, heads, -1).transpose(0, 1) for t in (q, k, v)]
        scores = split[0] @ split[1].transpose(1, 2) / split[0].shape[-1] ** 0.5
        out.append((scores.softmax(-1) @ split[2]).transpose(0, 1).reshape(length, -1))
        start += length
    return torch.cat(out)


def _packed_qkv(lengths, heads, head_size, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (sum(lengths), heads * head_size)
    q, k, v = (torch.randn(shape, generator=generator).to(dtype) for _ in range(3))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("head_size", [16, 32, 64, 128])
def test_kernel_matches_per_sentence_attention_in_fp32(head_size):
    q, k, v, cu = _packed_qkv(LENGTHS, 3, head_size, torch.float32)
    out = varlen_attention(q, k, v, cu, 3, head_size**-0.5)
    np.testing.assert_allclose(out.double().numpy(), _reference(q, k, v, LENGTHS, 3).numpy(), atol=2e-6)


@pytest.mark.parametrize("use_amx", [True, False], ids=["amx", "vector"])
@pytest.mark.parametrize("head_size", [16, 32, 64, 128])
def test_kernel_in_bf16_matches_per_sentence_attention(head_size, use_amx):
    lengths = [*LENGTHS, 31, 32, 47, 100]  # also 32-key steps of the tile path, and a long sentence
    q, k, v, cu = _packed_qkv(lengths, 3, head_size, torch.bfloat16, seed=head_size)
    out = varlen_attention(q, k, v, cu, 3, head_size**-0.5, use_amx=use_amx)
    assert out.dtype == torch.bfloat16
    # bf16 inputs and outputs (and, on the tile unit, bf16 probabilities): 2^-8 relative.
    np.testing.assert_allclose(out.double().numpy(), _reference(q, k, v, lengths, 3).numpy(), atol=1.5e-2)


@pytest.mark.parametrize("use_amx", [True, False], ids=["amx", "vector"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_reads_slices_of_one_fused_projection(dtype, use_amx):
    """The encoder passes q, k and v as column slices of one [tokens, 3 * width] tensor."""
    q, k, v, cu = _packed_qkv([*LENGTHS, 33], 3, 32, dtype)
    fused = torch.cat([q, k, v], dim=1)
    slices = fused.split(q.shape[1], dim=1)
    assert slices[1].stride() == (3 * q.shape[1], 1)
    out = varlen_attention(*slices, cu, 3, 32**-0.5, use_amx=use_amx)
    assert out.is_contiguous() and out.shape == q.shape
    torch.testing.assert_close(out, varlen_attention(q, k, v, cu, 3, 32**-0.5, use_amx=use_amx), rtol=0, atol=0)
    mixed = varlen_attention(q, slices[1], slices[2], cu, 3, 32**-0.5, use_amx=use_amx)  # rows not shared: copied
    torch.testing.assert_close(mixed, out, rtol=0, atol=0)


@pytest.mark.parametrize("use_amx", [True, False], ids=["amx", "vector"])
def test_kernel_in_bf16_handles_large_scores(use_amx):
    q, k, v, cu = _packed_qkv(LENGTHS, 2, 32, torch.bfloat16)
    q = q * 8  # scores in the hundreds: softmax needs its max subtracted to stay finite
    out = varlen_attention(q, k, v, cu, 2, 32**-0.5, use_amx=use_amx)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.double().numpy(), _reference(q, k, v, LENGTHS, 2).numpy(), atol=2e-2)


@pytest.mark.parametrize("use_amx", [True, False], ids=["amx", "vector"])
def test_kernel_in_bf16_handles_rows_far_apart(use_amx):
    """One query aligned with one key (a score in the hundreds) among rows of scores near zero: the
    tile path's shared softmax shift per block of rows would underflow the others, so each row
    takes its own."""
    q, k, v, cu = _packed_qkv([40], 2, 32, torch.bfloat16)
    q[3] = k[7] * 30
    out = varlen_attention(q, k, v, cu, 2, 32**-0.5, use_amx=use_amx)
    np.testing.assert_allclose(out.double().numpy(), _reference(q, k, v, [40], 2).numpy(), atol=2e-2)


def test_bf16_attention_uses_the_tile_unit_where_the_cpu_has_one():
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        flags = next(line for line in handle if line.startswith("flags")).split()
    assert amx_available() == ("amx_bf16" in flags and "amx_tile" in flags)


def test_kernel_rejects_what_it_cannot_compute():
    q, k, v, cu = _packed_qkv([4, 4], 2, 12, torch.float32)
    with pytest.raises(RuntimeError, match="head size 12"):
        varlen_attention(q, k, v, cu, 2, 1.0)
    q, k, v, cu = _packed_qkv([4, 4], 2, 16, torch.float64)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        varlen_attention(q, k, v, cu, 2, 1.0)
    q, k, v, _ = _packed_qkv([4, 4], 2, 16, torch.float32)
    with pytest.raises(RuntimeError, match="past the tokens"):
        varlen_attention(q, k, v, torch.tensor([0, 4, 9], dtype=torch.int32), 2, 1.0)


def test_rows_outside_every_sentence_come_back_zero():
    q, k, v, _ = _packed_qkv([5, 3], 2, 16, torch.float32)
    out = varlen_attention(q, k, v, torch.tensor([0, 5], dtype=torch.int32), 2, 0.25)
    assert torch.count_nonzero(out[5:]) == 0 and torch.count_nonzero(out[:5]) > 0


def test_a_missing_compiler_is_reported_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("EVENTCODER_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        build_kernel()
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built left behind


def test_the_built_kernel_is_cached_per_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("EVENTCODER_KERNEL_CACHE", str(tmp_path))
    first = build_kernel()
    built_at = first.stat().st_mtime_ns
    assert first.parent == tmp_path and first.stat().st_size > 0
    assert build_kernel() == first and first.stat().st_mtime_ns == built_at  # found, not rebuilt
    monkeypatch.setattr(cpu_kernels, "_cpu_signature", lambda: "flags : another cpu")
    assert kernel_path() != first  # -march=native code for one CPU is never loaded on another


def test_token_budget_batches_are_consecutive_and_within_budget():
    lengths = [5, 9, 3, 20, 1, 1, 8, 30, 2]
    batches = list(token_budget_batches(lengths, 16))
    assert [i for batch in batches for i in batch] == list(range(len(lengths)))
    for batch in batches:
        assert sum(lengths[i] for i in batch) <= 16 or len(batch) == 1


def test_pack_lays_sentences_end_to_end_and_fills_with_short_dummy_sentences():
    packed = pack([[101, 7, 102], [101, 8, 9, 102]], tokens_per_batch=64, pad_id=0)
    assert packed.input_ids.tolist()[:7] == [101, 7, 102, 101, 8, 9, 102]
    assert packed.input_ids.shape == (64,) and packed.input_ids[7:].eq(0).all()
    assert packed.position_ids.tolist()[:7] == [0, 1, 2, 0, 1, 2, 3]
    assert packed.sentence_index.tolist()[:7] == [0, 0, 0, 1, 1, 1, 1]
    assert packed.sentence_index[7:].eq(2).all()  # filler pools into the last row
    filler_lengths = packed.cu_seqlens.diff().tolist()[2:]
    assert sum(filler_lengths) == 57 and max(filler_lengths) == FILLER_SENTENCE
    assert packed.lengths.tolist() == [3, 4, 57]


def test_a_sentence_longer_than_the_budget_gets_a_batch_rounded_to_64_tokens():
    packed = pack([list(range(1, 101))], tokens_per_batch=32, pad_id=0)
    assert packed.input_ids.shape == (128,) and packed.lengths.tolist() == [100, 28]


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_packed_forward_computes_the_padded_forward(tiny_encoder, acled_schema, pooling):
    model = tiny_model(tiny_encoder, acled_schema, pooling).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    ids = tokenize(TEXTS, tokenizer, 32)
    with torch.no_grad():
        padded = model(**pad_batch(ids, tokenizer.pad_token_id))
        packed = PackedMultiTaskModel(model)(*pack(ids, 128, tokenizer.pad_token_id))
    for task, logits in padded.items():
        assert packed[task].shape[0] == len(TEXTS) + 1  # and the filler's row
        np.testing.assert_allclose(packed[task][: len(TEXTS)].numpy(), logits.numpy(), atol=1e-5)


def test_bf16_packed_forward_with_fused_up_projections_computes_the_padded_forward(tiny_encoder, acled_schema):
    model = tiny_model(tiny_encoder, acled_schema).eval()
    with torch.no_grad():  # random weights at BERT's initial scale barely reach the logits through the FFN
        for layer in model.encoder.encoder.layer:
            layer.intermediate.dense.weight.mul_(30)
            layer.output.dense.weight.mul_(30)
    model.to(torch.bfloat16).heads.float()
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    ids = tokenize(TEXTS, tokenizer, 32)
    packed_model = PackedMultiTaskModel(model)
    assert (packed_model.up_projections is not None) == amx_available()
    with torch.no_grad():
        padded = model(**pad_batch(ids, tokenizer.pad_token_id))
        packed = packed_model(*pack(ids, 128, tokenizer.pad_token_id))
    for task, logits in padded.items():
        # Two bf16 computations in different orders: a few units of bf16 rounding apart.
        np.testing.assert_allclose(packed[task][: len(TEXTS)].numpy(), logits.numpy(), atol=2e-2)


def test_up_projections_are_fused_only_where_the_kernel_computes_them(tiny_encoder, acled_schema):
    model = tiny_model(tiny_encoder, acled_schema)
    assert "not plain linear layers" in fused_up_projection_support(
        quantize_int8(tiny_model(tiny_encoder, acled_schema))
    )
    assert fused_up_projection_support(model) == "the encoder's weights are not bf16"
    model.to(torch.bfloat16)
    model.encoder.config.hidden_act = "gelu_new"
    assert fused_up_projection_support(model) == "the activation is 'gelu_new', not exact GELU"
    model.encoder.config.hidden_act = "gelu"
    assert fused_up_projection_support(model) == (None if amx_available() else "no AMX tile unit")


def test_predictor_packs_by_default_on_cpu_and_agrees_with_padded_batches(tiny_encoder, acled_schema):
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    texts = TEXTS * 7
    padded = Predictor(tiny_model(tiny_encoder, acled_schema), tokenizer, acled_schema, 32, CPU, packing=False)
    # A 40-token budget: batches of one to three sentences, some with no filler at all.
    packed = Predictor(tiny_model(tiny_encoder, acled_schema), tokenizer, acled_schema, 32, CPU, tokens_per_batch=40)
    assert padded.packed is None and packed.packed is not None
    expected, got = padded.probabilities(texts), packed.probabilities(texts)
    for task in expected:
        np.testing.assert_allclose(got[task], expected[task], atol=1e-5)


def test_compiled_packed_predictor_does_not_recompile_for_one_sentence_batches(tiny_encoder, acled_schema):
    from torch._dynamo.utils import counters

    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    eager = Predictor(tiny_model(tiny_encoder, acled_schema), tokenizer, acled_schema, 32, CPU).probabilities(TEXTS)
    predictor = Predictor(
        tiny_model(tiny_encoder, acled_schema), tokenizer, acled_schema, 32, CPU, compile=True, tokens_per_batch=64
    )
    counters.clear()
    compiled = predictor.probabilities(TEXTS)  # batches of 2, 1 and 1 sentences
    compiled_again = predictor.probabilities(TEXTS[:1])
    assert predictor.is_compiled and counters["stats"]["unique_graphs"] == 1
    for task in eager:
        np.testing.assert_allclose(compiled[task], eager[task], atol=1e-4)
        np.testing.assert_allclose(compiled_again[task], eager[task][:1], atol=1e-4)


def test_encoders_the_packed_path_cannot_run_fall_back_or_are_refused(tmp_path, tiny_encoder, acled_schema):
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    distil = DistilBertModel(DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2))
    odd_heads = BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=36,
            num_attention_heads=3,
            num_hidden_layers=1,
            intermediate_size=37,
        )
    )
    for encoder, reason in [(distil, "not DistilBertModel"), (odd_heads, "no head size 12")]:
        model = MultiTaskModel(encoder, acled_schema)
        assert reason in packing_support(model)
        assert Predictor(model, tokenizer, acled_schema, 32, CPU).packed is None
        with pytest.raises(ConfigError, match=f"--packing: .*{reason}"):
            Predictor(model, tokenizer, acled_schema, 32, CPU, packing=True)
