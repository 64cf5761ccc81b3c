import numpy as np
import pytest

from eventcoder.metrics import all_metrics, multi_label_metrics, single_label_metrics
from eventcoder.schema import schema_from_dict


def test_single_label_against_hand_computed_values():
    # gold: a a b c ; pred: a b b a
    metrics = single_label_metrics(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 0]), ("a", "b", "c"))
    assert metrics["accuracy"] == pytest.approx(0.5)
    # a: P=1/2 R=1/2 F1=1/2 ; b: P=1/2 R=1 F1=2/3 ; c: 0
    assert metrics["per_class"]["a"]["f1"] == pytest.approx(0.5)
    assert metrics["per_class"]["b"]["f1"] == pytest.approx(2 / 3)
    assert metrics["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert metrics["weighted_f1"] == pytest.approx((2 * 0.5 + 1 * 2 / 3) / 4)
    assert metrics["micro_f1"] == pytest.approx(0.5)
    assert metrics["confusion_matrix"]["matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_labels_absent_from_gold_and_predictions_do_not_count_in_macro():
    metrics = single_label_metrics(np.array([0, 1]), np.array([0, 1]), ("a", "b", "never"))
    assert metrics["macro_f1"] == pytest.approx(1.0)
    assert metrics["per_class"]["never"]["support"] == 0


def test_multi_label_against_hand_computed_values():
    gold = np.array([[1, 0], [1, 1]])
    pred = np.array([[1, 1], [0, 1]])
    metrics = multi_label_metrics(gold, pred, ("x", "y"))
    # x: P=1 R=1/2 F1=2/3 ; y: P=1/2 R=1 F1=2/3 ; subset accuracy 0
    assert metrics["macro_f1"] == pytest.approx(2 / 3)
    assert metrics["accuracy"] == 0.0


def test_derived_task_metrics_come_from_child_predictions():
    schema = schema_from_dict(
        {
            "name": "s",
            "main_task": "t",
            "tasks": [{"name": "t", "labels": ["a1", "a2", "b1"]}],
            "derived": [{"name": "p", "from": "t", "mapping": {"a1": "A", "a2": "A", "b1": "B"}}],
        }
    )
    # Child wrong (a1 vs a2) but parent right (A), and one parent error.
    metrics = all_metrics(schema, {"t": np.array([0, 2, 2])}, {"t": np.array([1, 2, 0])})
    assert metrics["t"]["accuracy"] == pytest.approx(1 / 3)
    assert metrics["p"]["accuracy"] == pytest.approx(2 / 3)


def test_expected_calibration_error_against_hand_computed_value():
    from eventcoder.metrics import expected_calibration_error

    # Bin 0.9-1.0: confidences .95,.95 (mean .95), accuracy 1/2 -> gap .45, weight 2/4.
    # Bin 0.5-0.6: confidences .55,.55, accuracy 1 -> gap .45, weight 2/4.
    confidence = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([1.0, 0.0, 1.0, 1.0])
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.45)
    assert expected_calibration_error(np.array([0.8, 0.8]), np.array([1.0, 0.0])) == pytest.approx(0.3)
