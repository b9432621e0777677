"""Load an experiment config: defaults <- YAML (file or preset) <- overrides.

OmegaConf merges YAML and ``key.sub=value`` overrides onto the typed
``ExperimentConfig``; it rejects unknown keys and values of the wrong type.
Each component's ``__post_init__`` then checks ranges. Every failure becomes
a one-line ``ConfigError`` that names the full key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError, DForgeError
from .schema import ExperimentConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
DEFAULT_PRESET = "fashion-flow"  # what `dforge train` trains with no CONFIG


def list_presets() -> dict[str, Path]:
    """Shipped preset name -> YAML path."""
    return {p.stem: p for p in sorted(PRESET_DIR.glob("*.yaml"))}


def preset_description(path: Path) -> str:
    """The first comment line of a preset file."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    presets = list_presets()
    if name_or_path in presets:
        return presets[name_or_path]
    raise ConfigError(f"config '{name_or_path}' is neither a file nor a preset "
                      f"(presets: {', '.join(presets)})")


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if type(err).__name__ == "ConfigKeyError" and key:
        return f"unknown config key '{key}'"
    return f"config key '{key}': {msg}" if key else msg


def _load_yaml(path: Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        first = str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid YAML (not a UTF-8 text file)") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return loaded


# Keys renamed since runs were first written: (section, old name, new name). A run directory's config.yaml
# (and a user's YAML or override) written with the old name still loads, under the new one.
RENAMED_KEYS = (("data.degradation", "task", "kind"),  # "task" names the kind of run (ExperimentConfig.task) only
                ("story", "task", "mode"))


def _rename_legacy_keys(layer: DictConfig) -> DictConfig:
    """``layer`` with the keys of RENAMED_KEYS under their new names (the new name wins if both are set)."""
    for section, old, new in RENAMED_KEYS:
        node = OmegaConf.select(layer, section, default=None)
        if isinstance(node, DictConfig) and old in node:
            value = node.pop(old)
            if new not in node:
                node[new] = value
    return layer


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad override: {_one_line(err)}") from None


def _to_object(cfg: DictConfig, prefix: str = "") -> object:
    """Build the dataclasses, children first, so a range error names its key."""
    for key in cfg.keys():
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and OmegaConf.get_type(child) not in (dict, None):
            _to_object(child, f"{prefix}{key}.")
    try:
        return OmegaConf.to_object(cfg)
    except DForgeError as err:
        raise ConfigError(_prefix_key(str(err), prefix)) from None
    except (ValueError, TypeError) as err:
        raise ConfigError(_prefix_key(str(err).splitlines()[0], prefix)) from None
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None


def _prefix_key(message: str, prefix: str) -> str:
    if not prefix or message.startswith(prefix):
        return message
    return f"{prefix.rstrip('.')}: {message}" if prefix else message


# data keys that describe a preset's own images: with data.name a folder of one's own images
# (data/config.py FOLDERS) the folder's files decide them (data/folder.py), unless a layer that names
# the folder (or comes after it) sets them
DATA_SHAPE_KEYS = ("image_size", "channels", "val_size")


def _data_shape_from_files(preset: Optional[DictConfig], overrides: DictConfig) -> list[DictConfig]:
    """The layers, with a preset's DATA_SHAPE_KEYS dropped and unset ones None when data.name is a folder."""
    from ..data.config import FOLDERS

    layers = [layer for layer in (preset, overrides) if layer is not None]
    names = [OmegaConf.select(layer, "data.name", default=None) for layer in layers]
    named = [i for i, name in enumerate(names) if name is not None]
    if not named or names[named[-1]] not in FOLDERS:
        return layers
    first = named[-1]  # the layer that chose the folder; the layers before it describe other images
    if first > 0:
        data = OmegaConf.select(layers[0], "data", default=None)
        for key in DATA_SHAPE_KEYS + (("degradation",) if names[first] == "paired-folder" else ()):
            data.pop(key, None)  # a paired folder's source/ replaces the preset's made-up sources
    given = {key for layer in layers[first:] for key in DATA_SHAPE_KEYS
             if OmegaConf.select(layer, f"data.{key}", default=None) is not None}
    unset = OmegaConf.create({"data": {key: None for key in DATA_SHAPE_KEYS if key not in given}})
    return [*layers[:-1], unset, layers[-1]]


def load_config(name_or_path: Optional[str] = None,
                overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Defaults, then the YAML file or preset, then the overrides; a YAML file without ``name`` names its
    runs after itself (``my-experiment.yaml`` -> ``runs/my-experiment-<time>``).

    A preset's data.image_size / channels / val_size describe its own images:
    overrides that set data.name=folder (or paired-folder) drop them, so the
    folder's files decide (unless the overrides set them too).
    """
    schema = OmegaConf.structured(ExperimentConfig)
    preset = None
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        preset = _rename_legacy_keys(_load_yaml(path))
        if OmegaConf.select(preset, "name", default=None) is None:  # a user's YAML names its runs by its file
            preset = OmegaConf.merge(preset, {"name": path.stem})
    override_layer = _rename_legacy_keys(_parse_overrides(overrides))
    layers = _data_shape_from_files(preset, override_layer)
    try:
        merged = OmegaConf.merge(schema, *layers)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    config = _to_object(merged)
    assert isinstance(config, ExperimentConfig)
    return config


def config_to_yaml(config: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
