import pytest

from eventcoder.config import load_config
from eventcoder.errors import ConfigError

BASE = """
data:
  train_files: [a.jsonl]
train:
  learning_rate: 3e-5
"""


def _write(tmp_path, text, name="params.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_reads_exponent_without_dot_as_float(tmp_path):
    config = load_config([_write(tmp_path, BASE)])
    assert config.train.learning_rate == pytest.approx(3e-5)
    assert isinstance(config.train.learning_rate, float)


def test_unknown_key_names_key_path_and_file(tmp_path):
    path = _write(tmp_path, BASE + "  learnig_rate: 1e-4\n")
    with pytest.raises(ConfigError) as error:
        load_config([path])
    message = str(error.value)
    assert str(path) in message and "train.learnig_rate" in message and "unknown key" in message
    assert "\n" not in message


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config([_write(tmp_path, BASE + "  batch_size: lots\n")])


def test_missing_value_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data: missing value"):
        load_config([_write(tmp_path, "seed: 1\n")])


def test_overrides_apply_with_yaml_types(tmp_path):
    config = load_config([_write(tmp_path, BASE)], ["train.learning_rate=2e-4", "train.epochs=3", "seed=7"])
    assert config.train.learning_rate == pytest.approx(2e-4)
    assert config.train.epochs == 3 and config.seed == 7


def test_override_of_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key"):
        load_config([_write(tmp_path, BASE)], ["train.epoch=3"])


def test_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match=r"expected key\.path=value"):
        load_config([_write(tmp_path, BASE)], ["train.epochs"])


def test_later_files_layer_over_earlier(tmp_path):
    base = _write(tmp_path, BASE)
    variant = _write(tmp_path, "train:\n  batch_size: 8\n", "variant.yaml")
    config = load_config([base, variant])
    assert config.train.batch_size == 8
    assert config.train.learning_rate == pytest.approx(3e-5)


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = _write(tmp_path, "data:\n  train_files: [a\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config([path])


def test_repository_params_are_valid():
    from conftest import REPO

    config = load_config([REPO / "params.yaml"])
    assert config.data.test_files == ["data/raw/heldout.jsonl"]
    assert config.digest() == load_config([REPO / "params.yaml"]).digest()
