"""The multi-task model: forward, loss, training step, save/load round trip."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from transformers import AutoTokenizer

from eventcoder.batching import inference_batches, label_arrays, pad_batch, tokenize, training_batches
from eventcoder.inference import COMPILE_MIN_TEXTS, Predictor
from eventcoder.model_dir import load_model_dir, save_model_dir
from eventcoder.modeling import MultiTaskLoss
from eventcoder.runtime import Runtime
from eventcoder.schema import schema_from_dict

TEXTS = ["Soldiers clashed with rebels near Gao.", "Hundreds marched peacefully.", "It rained."]
ROWS = [
    {"text": TEXTS[0], "sub_event_type": "Armed clash", "actor1": "State forces", "actor2": "Rebel groups"},
    {"text": TEXTS[1], "sub_event_type": "Peaceful protest", "actor1": "Protesters", "actor2": "none"},
    {"text": TEXTS[2], "sub_event_type": "none", "actor1": "none", "actor2": "none"},
]
CPU = Runtime(device=torch.device("cpu"), bf16=False)


def test_forward_shapes_and_loss_backward(tiny_encoder, acled_schema):
    model = tiny_model(tiny_encoder, acled_schema)
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    batch = pad_batch(tokenize(TEXTS, tokenizer, 32), tokenizer.pad_token_id)
    logits = model(**batch)
    assert {name: tuple(v.shape) for name, v in logits.items()} == {
        "sub_event_type": (3, 26),
        "actor1": (3, 9),
        "actor2": (3, 9),
    }
    labels = {k: torch.from_numpy(v) for k, v in label_arrays(ROWS, acled_schema).items()}
    loss, parts = MultiTaskLoss(acled_schema, {"actor1": 0.5}, {})(logits, labels)
    assert loss.item() == pytest.approx(parts["sub_event_type"] + 0.5 * parts["actor1"] + parts["actor2"], rel=1e-5)
    loss.backward()
    assert model.heads["actor2"].weight.grad is not None
    assert model.encoder.embeddings.word_embeddings.weight.grad is not None


def test_padding_does_not_change_mean_pooled_output(tiny_encoder, acled_schema):
    model = tiny_model(tiny_encoder, acled_schema).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    ids = tokenize(TEXTS, tokenizer, 32)
    alone = model(**pad_batch(ids[2:], tokenizer.pad_token_id))["sub_event_type"]
    padded = model(**pad_batch(ids, tokenizer.pad_token_id))["sub_event_type"][2:]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-4)


def test_save_load_round_trip_gives_identical_predictions(tmp_path, tiny_encoder, acled_schema):
    model = tiny_model(tiny_encoder, acled_schema)
    with torch.no_grad():
        model.heads["sub_event_type"].bias.add_(torch.linspace(0, 1, 26))
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    save_model_dir(tmp_path / "m", model, tokenizer, {"k": 1}, {"macro_f1": 0.5}, max_length=32)
    for name in (
        "encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "heads.safetensors",
        "schema.yaml",
        "labels.json",
        "config.yaml",
        "metrics.json",
        "eventcoder.json",
    ):
        assert (tmp_path / "m" / name).is_file(), name
    before = Predictor(model, tokenizer, acled_schema, 32, CPU).probabilities(TEXTS)
    loaded, _, schema, meta = load_model_dir(tmp_path / "m")
    after = Predictor(loaded, tokenizer, schema, meta["max_length"], CPU).probabilities(TEXTS)
    for task in before:
        np.testing.assert_allclose(before[task], after[task], atol=1e-6)


def test_predict_rows_have_every_task_and_derived_parent(tiny_encoder, acled_schema):
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    rows = Predictor(tiny_model(tiny_encoder, acled_schema), tokenizer, acled_schema, 32, CPU).predict(
        TEXTS, all_scores=True
    )
    mapping = acled_schema.derived[0].mapping
    for row in rows:
        assert row["event_type"] == mapping[row["sub_event_type"]]
        assert 0 < row["actor1_score"] <= 1
        assert row["sub_event_type_score"] == max(row["sub_event_type_scores"].values())
        assert sum(row["actor2_scores"].values()) == pytest.approx(1, abs=1e-4)


def test_multi_label_task_trains_and_thresholds(tiny_encoder):
    schema = schema_from_dict(
        {
            "name": "m",
            "main_task": "topic",
            "tasks": [{"name": "topic", "kind": "multi_label", "labels": ["a", "b", "c"], "thresholds": {"c": 0.99}}],
        }
    )
    model = tiny_model(tiny_encoder, schema)
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    rows = [{"text": t, "topic": labels} for t, labels in zip(TEXTS, [["a", "b"], ["b"], []], strict=True)]
    targets = {k: torch.from_numpy(v) for k, v in label_arrays(rows, schema).items()}
    assert targets["topic"].tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = pad_batch(tokenize(TEXTS, tokenizer, 32), tokenizer.pad_token_id)
    loss_fn = MultiTaskLoss(schema, {}, {})
    first = loss_fn(model(**batch), targets)[0].item()
    for _ in range(30):
        loss, _ = loss_fn(model(**batch), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < first / 2
    predicted = Predictor(model.eval(), tokenizer, schema, 32, CPU).predict(TEXTS)
    assert predicted[0]["topic"] == ["a", "b"] and predicted[2]["topic"] == []


def test_length_bucketing_groups_similar_lengths_and_covers_every_row():
    import random

    lengths = [random.Random(i).randint(5, 100) for i in range(1000)]
    batches = training_batches(lengths, 10, random.Random(0), bucket=True)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    unbucketed = training_batches(lengths, 10, random.Random(0), bucket=False)
    spread_plain = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in unbucketed])
    assert spread < spread_plain / 5


def test_inference_batches_sort_by_length_and_fill_the_last_batch():
    lengths = [5, 3, 9, 3, 5, 7, 2]
    batches = list(inference_batches(lengths, batch_size=4, row_multiple=4))
    assert batches[0] == [6, 1, 3, 0]
    assert batches[1] == [4, 5, 2, 2]  # three rows left, the last repeated to fill the shape
    assert sorted(set(i for batch in batches for i in batch)) == list(range(len(lengths)))


def test_rounded_shapes_and_filler_rows_do_not_change_the_answers(tiny_encoder, acled_schema):
    model = tiny_model(tiny_encoder, acled_schema).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    texts = [*TEXTS, "Police fired tear gas.", "Gunmen attacked a convoy near Kidal on Tuesday."]
    probs = Predictor(model, tokenizer, acled_schema, 32, CPU, batch_size=3, packing=False).probabilities(texts)
    for i, ids in enumerate(tokenize(texts, tokenizer, 32)):
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        for task, logits in alone.items():
            np.testing.assert_allclose(probs[task][i], torch.softmax(logits[0], -1).numpy(), atol=1e-5)


def test_bf16_predictor_keeps_heads_fp32_and_agrees_with_fp32(tiny_encoder, acled_schema):
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    fp32 = Predictor(tiny_model(tiny_encoder, acled_schema), tokenizer, acled_schema, 32, CPU).probabilities(TEXTS)
    bf16_runtime = Runtime(device=torch.device("cpu"), bf16=True)
    predictor = Predictor(tiny_model(tiny_encoder, acled_schema), tokenizer, acled_schema, 32, bf16_runtime)
    assert predictor.model.encoder.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert predictor.model.heads["actor1"].weight.dtype == torch.float32
    for task, probs in predictor.probabilities(TEXTS).items():
        np.testing.assert_allclose(probs, fp32[task], atol=0.02)


@pytest.mark.parametrize("packing", [False, None], ids=["padded", "packed"])
def test_compiled_predictor_gives_the_eager_answers(tiny_encoder, acled_schema, packing):
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    texts = [*TEXTS, "Police fired tear gas at students in Dhaka.", "Shelling hit two villages."]
    eager = Predictor(tiny_model(tiny_encoder, acled_schema), tokenizer, acled_schema, 32, CPU).probabilities(texts)
    predictor = Predictor(
        tiny_model(tiny_encoder, acled_schema), tokenizer, acled_schema, 32, CPU, compile=True, packing=packing
    )
    compiled = predictor.probabilities(texts)
    assert predictor.is_compiled
    for task in eager:
        np.testing.assert_allclose(compiled[task], eager[task], atol=1e-4)


def test_auto_compile_falls_back_to_eager_when_the_compiler_fails(tiny_encoder, acled_schema, caplog):
    import torch._inductor.config as inductor_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    texts = [f"Clashes in district {i} left {i % 7} dead." for i in range(COMPILE_MIN_TEXTS)]
    predictor = Predictor(tiny_model(tiny_encoder, acled_schema), tokenizer, acled_schema, 32, CPU, compile=None)
    # inductor_config.patch, not monkeypatch: monkeypatch's undo deletes config entries, and every
    # later compile in the session then fails.
    broken = inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False})
    with broken, caplog.at_level("WARNING"):
        rows = predictor.predict(texts)
    assert len(rows) == COMPILE_MIN_TEXTS
    assert "torch.compile failed" in caplog.text
    assert predictor.compile is False


def test_frozen_word_embeddings_stay_fixed_while_the_rest_trains(tmp_path, tiny_encoder, acled_schema):
    from conftest import write_config

    from eventcoder.config import load_config
    from eventcoder.training import build_optimizer, freeze_word_embeddings

    config = load_config([write_config(tmp_path, tiny_encoder)])
    model = tiny_model(tiny_encoder, acled_schema).train()
    freeze_word_embeddings(model)
    optimizer = build_optimizer(model, config, CPU)
    table = model.encoder.get_input_embeddings().weight
    assert all(p is not table for group in optimizer.param_groups for p in group["params"])
    before_table = table.detach().clone()
    before_query = model.encoder.encoder.layer[0].attention.self.query.weight.detach().clone()
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    labels = {k: torch.from_numpy(v) for k, v in label_arrays(ROWS, acled_schema).items()}
    loss, _ = MultiTaskLoss(acled_schema, {}, {})(
        model(**pad_batch(tokenize(TEXTS, tokenizer, 32), tokenizer.pad_token_id)), labels
    )
    loss.backward()
    optimizer.step()
    assert torch.equal(table, before_table)
    assert not torch.equal(model.encoder.encoder.layer[0].attention.self.query.weight, before_query)


def test_training_leaves_the_word_embedding_table_as_the_encoder_shipped_it(registered_tiny_model, tiny_encoder):
    from safetensors.torch import load_file

    original = load_file(tiny_encoder / "model.safetensors")
    trained = load_file(Path(registered_tiny_model["model_dir"]) / "encoder" / "model.safetensors")
    table = next(key for key in original if key.endswith("word_embeddings.weight"))
    query = next(key for key in original if key.endswith("layer.0.attention.self.query.weight"))
    assert torch.equal(trained[table], original[table])  # train.freeze_word_embeddings defaults to true
    assert not torch.equal(trained[query], original[query])


def test_pad_batch_rounds_the_width_up_and_masks_only_real_tokens():
    batch = pad_batch([[5, 6, 7], [8, 9, 10, 11, 12]], pad_id=0, width_multiple=8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].sum(1).tolist() == [3, 5]
    assert batch["input_ids"][1].tolist() == [8, 9, 10, 11, 12, 0, 0, 0]
