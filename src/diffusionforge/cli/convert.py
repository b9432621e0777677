"""`dforge convert SRC --kind {vae,unet,dit} --to {ours,diffusers} --out DST`: one network between formats.

SRC layouts, recognised in this order:

=====================================  ==================================================
SRC                                    read as
=====================================  ==================================================
folder with ``config.yaml``            a `dforge train` run (its VAE, or its backbone's EMA weights)
folder, ``config.json`` ``"format":    our format (``interop.ours``)
"diffusionforge"``
folder with ``config.json``            a diffusers model folder (``_class_name`` must fit --kind)
folder with ``vae/`` or ``unet/``      a diffusers pipeline folder; the --kind subfolder
``.ckpt`` / ``.pt`` / ``.pth`` file    a CompVis checkpoint (``torch.load(weights_only=True)``); for
                                       --kind dit an official facebookresearch/DiT one
``.safetensors`` file                  CompVis keys (prefixed or bare); config from --config
=====================================  ==================================================

DST is written in a temporary folder beside it and renamed into place at
the end, so a failure never leaves a half-written DST.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Optional

import torch
import yaml
from torch import Tensor, nn

from ..checkpoints import WEIGHTS_ONLY_FAILURE, imports_objects
from ..errors import CheckpointError, ConfigError, DForgeError
from ..interop.dit import (OFFICIAL_DIT_KEY, dit_config_from_diffusers, dit_config_to_diffusers, load_diffusers_dit,
                           load_official_dit, save_diffusers_dit)
from ..interop.files import DIFFUSERS_CONFIG_NAME, first_line, read_json, read_safetensors
from ..interop.ours import OURS_FORMAT, Kind, config_from_dict, load_ours, save_ours
from ..interop.unet import (COMPVIS_UNET_PREFIX, load_compvis_unet, load_diffusers_unet, save_diffusers_unet,
                            sd_v1_unet_config, unet_config_from_diffusers, unet_config_to_diffusers)
from ..interop.vae import (COMPVIS_PREFIX, load_compvis_vae, load_diffusers_vae, save_diffusers_vae,
                           sd_v1_vae_config, vae_config_from_diffusers, vae_config_to_diffusers)
from ..runs import CONFIG_FILE as RUN_CONFIG_FILE
from ..utils.outputs import check_output_parent

EXAMPLE = """examples:
  dforge convert stable-diffusion-v1-5 --kind vae --to ours --out sd15-vae     # diffusers pipeline folder
  dforge convert v1-5-pruned-emaonly.ckpt --kind unet --to diffusers --out sd15-unet
  dforge convert kl-f4.ckpt --kind vae --config kl-f4-autoencoder.yaml --to ours --out kl-f4  # AutoencoderConfig fields
  dforge convert sd15-vae --kind vae --to diffusers --out sd15-vae-diffusers --overwrite
  dforge convert DiT-XL-2-256x256.pt --kind dit --to diffusers --out dit-xl-2   # official DiT checkpoint
  dforge convert runs/fashion-dit-<time> --kind dit --to ours --out fashion-dit"""

DESCRIPTION = """Convert one network (the KL autoencoder, the Stable Diffusion UNet or
the class-conditional DiT) between formats. SRC is a diffusers model or pipeline folder, a CompVis
checkpoint (.ckpt/.pt/.pth, or .safetensors with CompVis keys; the config
defaults to Stable Diffusion v1, or --config), or our format (a folder with
config.json + model.safetensors). --config is a JSON or YAML file with our
config's fields (AutoencoderConfig / UNetConfig) or a diffusers config.json."""

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")  # read with torch.load(weights_only=True)
SAFETENSORS_SUFFIX = ".safetensors"


class Interop(NamedTuple):
    """How one kind of network is read and written in the foreign formats."""

    diffusers_class: str  # "_class_name" of its diffusers config.json
    subfolder: str  # its folder inside a diffusers pipeline folder
    compvis_prefix: str  # its key prefix inside a whole CompVis / LDM checkpoint
    bare_key: str  # a key that only its unprefixed state dict has
    default_config: Callable[[], Any]  # config of a CompVis checkpoint without --config (SD v1)
    config_from_diffusers: Callable[[Mapping[str, Any]], Any]
    config_to_diffusers: Callable[[Any], dict]  # raises CheckpointError for what diffusers cannot express
    load_diffusers: Callable[[Path], nn.Module]
    load_compvis: Callable[[Mapping[str, Tensor], Any], nn.Module]
    save_diffusers: Callable[[nn.Module, Path], Path]


INTEROP: dict[str, Interop] = {
    "vae": Interop("AutoencoderKL", "vae", COMPVIS_PREFIX, "encoder.conv_in.weight", sd_v1_vae_config,
                   vae_config_from_diffusers, vae_config_to_diffusers, load_diffusers_vae, load_compvis_vae,
                   save_diffusers_vae),
    "unet": Interop("UNet2DConditionModel", "unet", COMPVIS_UNET_PREFIX, "input_blocks.0.0.weight",
                    sd_v1_unet_config, unet_config_from_diffusers, unet_config_to_diffusers, load_diffusers_unet,
                    load_compvis_unet, save_diffusers_unet),
    # DiT: "CompVis" stands for the official facebookresearch/DiT state dict; its config is read off the shapes
    "dit": Interop("DiTTransformer2DModel", "transformer", "y_embedder.", OFFICIAL_DIT_KEY, lambda: None,
                   dit_config_from_diffusers, dit_config_to_diffusers, load_diffusers_dit, load_official_dit,
                   save_diffusers_dit),
}
FORMATS = ("ours", "diffusers")


class Loaded(NamedTuple):
    """A network read from SRC and the layout it was read as (for the report line)."""

    model: nn.Module
    layout: str  # e.g. "diffusers folder", "CompVis checkpoint"


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a VAE, UNet or DiT between diffusers, CompVis / official and our format",
                       description=DESCRIPTION, epilog=EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="diffusers folder, CompVis .ckpt/.safetensors, or our folder")
    p.add_argument("--kind", choices=sorted(INTEROP), required=True, help="which network SRC holds / to take")
    p.add_argument("--to", choices=FORMATS, required=True,
                   help="ours = config.json + model.safetensors; diffusers = a from_pretrained folder")
    p.add_argument("--out", metavar="DST", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--config", metavar="CONFIG", default=None,
                   help="JSON/YAML network config for a CompVis checkpoint (default: Stable Diffusion v1)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), check_output_parent(args.out)
    check_destination(src, dst, args.overwrite)
    loaded = load_network(src, args.kind, None if args.config is None else Path(args.config))
    if args.to == "diffusers":  # refuse what diffusers cannot express before writing anything
        INTEROP[args.kind].config_to_diffusers(loaded.model.config)
    write_atomically(dst, lambda folder: save_network(loaded.model, args.kind, args.to, folder))
    count = sum(p.numel() for p in loaded.model.parameters())
    print(f"wrote {dst}: {args.kind} ({type(loaded.model).__name__}, {count:,} parameters) "
          f"in {args.to} format, from the {loaded.layout} {src}")
    return 0


# ------------------------------------------------------------------ reading
def load_network(src: Path, kind: Kind, config_path: Optional[Path] = None) -> Loaded:
    """The ``kind`` network in SRC (eval mode); ``config_path`` only for CompVis checkpoint files."""
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or directory")
    if src.is_dir() and (src / RUN_CONFIG_FILE).is_file():
        return load_run_network(src, kind, config_path)
    if src.is_dir():
        if config_path is not None:
            raise ConfigError(f"--config is for CompVis checkpoint files; the folder {src} has its own config")
        return _load_folder(src, kind)
    return _load_checkpoint_file(src, kind, config_path)


def load_run_network(run_dir: Path, kind: Kind, config_path: Optional[Path] = None) -> Loaded:
    """The ``kind`` network of a `dforge train` run directory (config.yaml + exported weights).

    vae: an autoencoder run's network, or a latent run's frozen first stage;
    unet: a diffusion run's backbone with its EMA weights.
    """
    from ..runs import load_first_stage_copy, load_run_model, open_run

    if config_path is not None:
        raise ConfigError("--config: a run directory carries its own config.yaml")
    run_dir, config = open_run(run_dir)
    if kind == "vae":
        if config.task == "autoencoder":
            from ..autoencoder_run import load_autoencoder_run

            return Loaded(load_autoencoder_run(run_dir)[0], "autoencoder run")
        if config.model.first_stage == "autoencoder":
            return Loaded(load_first_stage_copy(run_dir), "latent run's first stage")
        raise CheckpointError(f"{run_dir}: a pixel-space run has no vae (use --kind unet)")
    if config.task != "diffusion":
        raise CheckpointError(f"{run_dir}: a task={config.task} run has no {kind} (use --kind vae)")
    if config.model.backbone != kind:
        raise CheckpointError(f"{run_dir}: kind mismatch: this run's backbone is a {config.model.backbone} "
                              f"(pass --kind {config.model.backbone})")
    model, _ = load_run_model(run_dir)
    net = model.sampling_net()
    if kind == "dit":
        return Loaded(label_dit_of_run(run_dir, config, net), "diffusion run (EMA weights)")
    return Loaded(net["backbone"], "diffusion run (EMA weights)")


def label_dit_of_run(run_dir: Path, config: Any, net: nn.Module) -> nn.Module:
    """The published DiT layout (``LabelDiT``) of a class-conditional DiT run: its table joins the backbone."""
    import dataclasses

    from ..backbones.dit import LabelDiT, LabelDiTConfig
    from ..conditioning.class_label import ClassEmbedder

    backbone, conditioners = net["backbone"], list(net["conditioner"].conditioners)
    if len(conditioners) != 1 or not isinstance(conditioners[0], ClassEmbedder) or \
            conditioners[0].dim != backbone.config.hidden_size:
        raise CheckpointError(f"{run_dir}: only a DiT conditioned on class labels alone, with "
                              f"class_label.embed_dim = hidden_size, has the published DiT layout")
    fields = dataclasses.asdict(backbone.config)
    label_dit = LabelDiT(LabelDiTConfig(**fields, num_classes=conditioners[0].num_classes))
    state = dict(backbone.state_dict(), **{"y_embedder.embedding_table.weight": conditioners[0].embedding.weight})
    label_dit.load_state_dict(state)
    return label_dit.eval()


def _load_folder(src: Path, kind: Kind) -> Loaded:
    """Our folder, a diffusers model folder, or a diffusers pipeline folder with the ``kind`` subfolder."""
    config_path = src / DIFFUSERS_CONFIG_NAME
    if config_path.is_file():
        data = read_json(config_path)
        if data.get("format") == OURS_FORMAT:
            model, found = load_ours(src)
            _check_kind(src, found, kind, "diffusionforge folder")
            return Loaded(model, "diffusionforge folder")
        _check_kind(src, _diffusers_kind(config_path, data, kind), kind, "diffusers folder")
        return Loaded(INTEROP[kind].load_diffusers(src), "diffusers folder")
    nested = {k: src / i.subfolder for k, i in INTEROP.items() if (src / i.subfolder / DIFFUSERS_CONFIG_NAME).is_file()}
    if kind in nested:
        return Loaded(_load_folder(nested[kind], kind).model, "diffusers pipeline folder")
    if nested:
        has = ", ".join(f"{INTEROP[k].subfolder}/" for k in nested)
        raise CheckpointError(f"{src}: kind mismatch: this pipeline folder has {has} but no "
                              f"{INTEROP[kind].subfolder}/ for --kind {kind}")
    raise CheckpointError(f"{src}: unknown layout: expected {DIFFUSERS_CONFIG_NAME} (diffusers or diffusionforge "
                          f"network), a pipeline folder with vae/ or unet/, or {RUN_CONFIG_FILE} (a run)")


def _diffusers_kind(config_path: Any, data: Mapping[str, Any], kind: Kind) -> Kind:
    """The kind named by a diffusers config's ``_class_name`` (``kind`` itself when it has none)."""
    name = data.get("_class_name")
    if name is None:
        return kind
    kinds = {i.diffusers_class: k for k, i in INTEROP.items()}
    if name not in kinds:
        raise CheckpointError(f"{config_path}: unknown layout: diffusers class {name!r} is not one of {sorted(kinds)}")
    return kinds[name]


def _check_kind(src: Any, found: str, kind: Kind, layout: str) -> None:
    if found != kind:
        raise CheckpointError(f"{src}: kind mismatch: this {layout} holds a {found}, not a {kind} "
                              f"(pass --kind {found})")


def _load_checkpoint_file(src: Path, kind: Kind, config_path: Optional[Path]) -> Loaded:
    state = _read_state_dict(src)
    found = {k for k, i in INTEROP.items() if any(key.startswith(i.compvis_prefix) or key == i.bare_key
                                                  for key in state)}
    if found and kind not in found:
        _check_kind(src, found.pop(), kind, "checkpoint")
    interop = INTEROP[kind]
    config = interop.default_config() if config_path is None else read_network_config(config_path, kind)
    try:
        return Loaded(interop.load_compvis(state, config), "CompVis checkpoint")
    except CheckpointError as err:
        hint = (" (the config is Stable Diffusion v1's; pass --config for another)"
                if config_path is None and kind != "dit" else "")
        raise CheckpointError(f"{src}: {err}{hint}") from None


def _read_state_dict(src: Path) -> dict[str, Tensor]:
    """The tensors of a CompVis checkpoint file (``"state_dict"`` unwrapped; other entries dropped)."""
    suffix = src.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        data: Any = read_safetensors(src)
    elif suffix in CHECKPOINT_SUFFIXES:
        data = _torch_load(src)
    else:
        known = ", ".join((*CHECKPOINT_SUFFIXES, SAFETENSORS_SUFFIX))
        raise CheckpointError(f"{src}: unknown layout: expected a folder or a {known} file")
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    elif isinstance(data, Mapping) and isinstance(data.get("ema"), Mapping):  # a DiT train.py checkpoint
        data = data["ema"]
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{src}: expected a state dict, got {type(data).__name__}")
    return {key: value for key, value in data.items() if isinstance(value, Tensor)}


def _torch_load(src: Path) -> Any:
    """torch.load(weights_only=True) of a foreign file; a payload, garbage or a truncated file is one line."""
    try:
        return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if WEIGHTS_ONLY_FAILURE in str(err) and ("GLOBAL" in str(err) or imports_objects(src)):
            raise CheckpointError(f"{src}: the checkpoint holds objects that are not plain tensors and will "
                                  "not be loaded (nothing in it was executed)") from None
        reason = "not a PyTorch checkpoint" if WEIGHTS_ONLY_FAILURE in str(err) else first_line(err)
        raise CheckpointError(f"{src}: cannot read with torch.load(weights_only=True): {reason}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:  # the zip reader's and I/O errors
        reason = "unexpected end of file" if isinstance(err, EOFError) else first_line(err)
        raise CheckpointError(f"{src}: cannot read with torch.load(weights_only=True): {reason}") from None


def read_network_config(path: Path, kind: Kind) -> Any:
    """The ``kind`` config in a JSON/YAML file: our config's fields, our config.json, or a diffusers config.json."""
    label = f"--config {path}"
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"{label}: cannot read: {first_line(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping of config fields, got {type(data).__name__}")
    if "_class_name" in data:
        _check_kind(label, _diffusers_kind(label, data, kind), kind, "diffusers config")
        build = INTEROP[kind].config_from_diffusers
    else:
        fmt, found = data.pop("format", OURS_FORMAT), data.pop("kind", kind)
        if fmt != OURS_FORMAT:
            raise ConfigError(f"{label}: \"format\" must be {OURS_FORMAT!r}, got {fmt!r}")
        _check_kind(label, found, kind, "diffusionforge config")
        build = partial(config_from_dict, kind)
    try:
        return build(data)
    except DForgeError as err:
        raise ConfigError(f"{label}: {err}") from None


# ------------------------------------------------------------------ writing
def save_network(model: nn.Module, kind: Kind, to: str, directory: Path) -> Path:
    """Write ``model`` into ``directory`` in format ``to`` ("ours" or "diffusers")."""
    if to == "ours":
        return save_ours(model, kind, directory)
    return INTEROP[kind].save_diffusers(model, directory)


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse a DST that is a file, non-empty (without --overwrite), SRC itself or a folder holding SRC."""
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"--out {dst}: exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ConfigError(f"--out {dst}: exists and is not empty (pass --overwrite to replace it)")
    src_abs, dst_abs = src.resolve(), dst.resolve()
    if dst_abs == src_abs or dst_abs in src_abs.parents:
        raise ConfigError(f"--out {dst}: would replace SRC {src}; choose another folder")


def write_atomically(dst: Path, write: Callable[[Path], Any]) -> Path:
    """Run ``write(folder)`` on a temporary folder beside ``dst``, then rename it to ``dst`` (replacing it)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700
        _replace_folder(tmp, dst)
    except OSError as err:
        raise CheckpointError(f"--out {dst}: cannot write: {first_line(err)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return dst


def _replace_folder(new: Path, dst: Path) -> None:
    """Rename ``new`` to ``dst``; a non-empty ``dst`` is moved aside first and deleted after."""
    old = None
    if dst.is_dir() and any(dst.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
        os.replace(dst, old)
    try:
        os.replace(new, dst)
    except OSError:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old)
