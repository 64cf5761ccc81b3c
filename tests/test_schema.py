import pytest

from eventcoder.errors import SchemaError
from eventcoder.schema import schema_from_dict


def test_acled_schema_has_the_design_labels(acled_schema):
    sub = acled_schema.task("sub_event_type")
    assert sub.num_labels == 26 and sub.labels[0] == "none"
    assert acled_schema.task("actor1").labels == acled_schema.task("actor2").labels
    assert "External/Other forces" in acled_schema.task("actor1").labels
    event_type = acled_schema.derived[0]
    assert event_type.name == "event_type" and len(event_type.labels) == 7
    assert event_type.mapping["Air/drone strike"] == "Explosions/Remote violence"


def test_label_ids_follow_file_order_not_data():
    schema = schema_from_dict(
        {"name": "s", "main_task": "t", "tasks": [{"name": "t", "labels": ["zeta", "alpha", "mid"]}]}
    )
    assert [schema.task("t").label_id(x) for x in ("zeta", "alpha", "mid")] == [0, 1, 2]


def test_derived_mapping_must_cover_every_source_label():
    with pytest.raises(SchemaError, match="missing \\['b'\\]"):
        schema_from_dict(
            {
                "name": "s",
                "main_task": "t",
                "tasks": [{"name": "t", "labels": ["a", "b"]}],
                "derived": [{"name": "p", "from": "t", "mapping": {"a": "x"}}],
            }
        )


def test_duplicate_labels_rejected():
    with pytest.raises(SchemaError, match="duplicate labels"):
        schema_from_dict({"name": "s", "main_task": "t", "tasks": [{"name": "t", "labels": ["a", "a"]}]})


def test_main_task_must_exist():
    with pytest.raises(SchemaError, match="main_task"):
        schema_from_dict({"name": "s", "main_task": "nope", "tasks": [{"name": "t", "labels": ["a", "b"]}]})


def test_multi_label_thresholds():
    schema = schema_from_dict(
        {
            "name": "s",
            "main_task": "t",
            "tasks": [
                {"name": "t", "kind": "multi_label", "labels": ["a", "b"], "threshold": 0.4, "thresholds": {"b": 0.7}}
            ],
        }
    )
    task = schema.task("t")
    assert task.threshold_for("a") == 0.4 and task.threshold_for("b") == 0.7


def test_thresholds_only_for_multi_label():
    with pytest.raises(SchemaError, match="only apply to multi_label"):
        schema_from_dict(
            {"name": "s", "main_task": "t", "tasks": [{"name": "t", "labels": ["a", "b"], "thresholds": {"a": 0.3}}]}
        )


def test_example_plover_schema_mixes_single_and_multi_label_tasks():
    from conftest import REPO

    from eventcoder.schema import load_schema

    schema = load_schema(REPO / "configs" / "schemas" / "plover.yaml")
    assert schema.task("modes").kind == "multi_label" and schema.task("event").labels[0] == "none"
    assert schema.derived[0].mapping["ASSAULT"] == "material conflict"


def test_experiment_variants_layer_over_params():
    from conftest import REPO

    from eventcoder.config import load_config

    for variant in sorted((REPO / "configs" / "experiments").glob("*.yaml")):
        config = load_config([REPO / "params.yaml", variant])
        assert config.train.output_dir != "models/eventcoder", f"{variant} would overwrite the default model"


def test_derived_task_needs_a_single_label_source():
    with pytest.raises(SchemaError, match="must be single_label"):
        schema_from_dict(
            {
                "name": "s",
                "main_task": "t",
                "tasks": [{"name": "t", "kind": "multi_label", "labels": ["a", "b"]}],
                "derived": [{"name": "p", "from": "t", "mapping": {"a": "x", "b": "y"}}],
            }
        )
    with pytest.raises(SchemaError, match="is not a task"):
        schema_from_dict(
            {
                "name": "s",
                "main_task": "t",
                "tasks": [{"name": "t", "labels": ["a", "b"]}],
                "derived": [{"name": "p", "from": "nope", "mapping": {"a": "x", "b": "y"}}],
            }
        )
