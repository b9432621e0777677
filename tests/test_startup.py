"""Start-up stays cheap: config loading and the CLI parser import neither torch nor Lightning.

``dforge presets``, ``dforge --help`` and a config error must answer at once,
so loading a config (every preset) and building the argument parser must not
import the heavy libraries. Each check runs in a fresh interpreter, whose
``sys.modules`` starts empty. Wall-clock figures are in
``benchmarks/startup.py``, not here.

The rule for ``cli/*.py`` (``cli/main.py``'s docstring): at module level,
import only the standard library and the light diffusionforge modules
(``errors``, ``utils.outputs``, ``config.loader``, other ``cli`` modules);
import ``runs``, ``tasks``, ``models``, torch, Lightning, numpy, PIL, ... inside
the function that runs the command. ``tests/test_architecture.py`` checks the
import statements as written; this file checks what actually gets loaded.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from diffusionforge.config.loader import list_presets

# third-party packages that cost from 0.1 s (numpy) to 4 s (lightning) to import on the 2-core machine
HEAVY = ("torch", "lightning", "lightning_fabric", "pytorch_lightning", "torchmetrics", "numpy", "PIL",
         "safetensors", "einops", "tqdm", "transformers", "diffusers", "h5py", "skimage", "scipy", "matplotlib", "gradio")
TORCH_FREE_CONFIG_MODULES = ("backbones", "conditioning", "processes", "first_stage", "losses", "data")
LAZY_PACKAGES = TORCH_FREE_CONFIG_MODULES


def heavy_modules_after(code: str) -> list[str]:
    """The HEAVY packages in ``sys.modules`` after a fresh interpreter runs ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_loading_every_preset_imports_no_heavy_library():
    code = ("from diffusionforge.config.loader import list_presets, load_config\n"
            "for name in list_presets():\n"
            "    load_config(name)\n"
            "load_config('fashion-ddpm', ['model.backbone=dit', 'trainer.max_steps=10'])")
    assert heavy_modules_after(code) == []


@pytest.mark.parametrize("package", TORCH_FREE_CONFIG_MODULES)
def test_config_modules_are_torch_free(package):
    assert heavy_modules_after(f"import diffusionforge.{package}.config") == []


def test_every_cli_module_and_the_parser_import_no_heavy_library():
    code = ("import importlib, pkgutil\n"
            "import diffusionforge.cli as cli\n"
            "for info in pkgutil.iter_modules(cli.__path__):\n"
            "    importlib.import_module(f'diffusionforge.cli.{info.name}')\n"
            "from diffusionforge.cli.main import build_parser\n"
            "build_parser()")
    heavy = heavy_modules_after(code)
    assert heavy == [], (f"a cli module imports {heavy} at module level; import it inside the function "
                         "that runs the command, so `dforge --help` and config errors stay instant")


@pytest.mark.parametrize("argv", [["presets"], ["--help"], ["train", "bad_key=1"]])
def test_instant_commands_import_no_heavy_library(argv):
    code = ("import contextlib, io\n"
            "from diffusionforge.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "    try:\n"
            f"        main({argv!r})\n"
            "    except SystemExit:\n"
            "        pass")
    assert heavy_modules_after(code) == []


def launchers() -> list[list[str]]:
    found = [[sys.executable, "-m", "diffusionforge.cli.main"]]
    script = os.path.join(os.path.dirname(sys.executable), "dforge")
    if os.path.exists(script) or shutil.which("dforge"):
        found.append([script if os.path.exists(script) else shutil.which("dforge")])
    return found


@pytest.fixture(params=launchers(), ids=lambda argv: os.path.basename(argv[-1]))
def dforge(request):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*request.param, *args], capture_output=True, text=True, timeout=120)
    return run


def test_dforge_presets_lists_every_preset(dforge):
    done = dforge("presets")
    assert done.returncode == 0 and done.stderr == ""
    names = [line.split()[0] for line in done.stdout.splitlines()]
    assert names == list(list_presets())


def test_dforge_help_lists_every_command(dforge):
    done = dforge("--help")
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith("usage: dforge")
    for command in ("train", "cache", "sample", "translate", "story", "evaluate", "convert", "plot", "serve", "presets"):
        assert re.search(rf"^    {command}\b", done.stdout, re.MULTILINE), command


def test_dforge_config_error_is_one_line_and_exit_2(dforge):
    done = dforge("train", "bad_key=1")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == "dforge: error: unknown config key 'bad_key'\n"


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_lazy_package_attributes_resolve(package):
    """Every name in a package's ``__all__`` still imports (on first use) and shows in ``dir``."""
    module = importlib.import_module(f"diffusionforge.{package}")
    for name in module.__all__:
        assert getattr(module, name) is not None
        assert name in dir(module)
    with pytest.raises(AttributeError):
        getattr(module, "no_such_name")


def test_torch_free_name_tables_list_the_registries():
    """The config modules spell out names whose implementations live beside torch code."""
    from diffusionforge.conditioning.config import TEXT_ENCODER_NAMES
    from diffusionforge.conditioning.text import TEXT_ENCODERS
    from diffusionforge.losses.config import DiscLossName
    from diffusionforge.losses.discriminator import D_LOSSES
    from typing import get_args

    assert set(TEXT_ENCODER_NAMES) == set(TEXT_ENCODERS)
    assert set(get_args(DiscLossName)) == set(D_LOSSES)


MOVED = [  # (module that builds it, torch-free module the names moved to, names)
    ("backbones.unet", "backbones.config", ("UNetConfig",)),
    ("backbones.dit", "backbones.config", ("DiTConfig", "LabelDiTConfig", "DIT_MODELS")),
    ("conditioning.class_label", "conditioning.config", ("ClassLabelConfig",)),
    ("conditioning.spatial", "conditioning.config", ("ConcatConditionerConfig",)),
    ("conditioning.latents_concat", "conditioning.config", ("LatentsConcatConfig",)),
    ("conditioning.text", "conditioning.config", ("TextConditionerConfig",)),
    ("conditioning.story", "conditioning.config", ("StoryConditionerConfig",)),
    ("data.datamodule", "data.config", ("DataConfig",)),
    ("data.degradations", "data.config", ("DegradationConfig",)),
    ("data.stories", "data.config", ("StoryConfig", "SIZES")),
    ("first_stage.autoencoder", "first_stage.config", ("AutoencoderConfig",)),
    ("losses.autoencoder_loss", "losses.config", ("AutoencoderLossConfig",)),
    ("processes.gaussian", "processes.config", ("GaussianDiffusionConfig",)),
    ("processes.bridge", "processes.config", ("BridgeMatchingConfig",)),
    ("processes.schedules", "processes.config", ("BetaScheduleName",)),
]


@pytest.mark.parametrize("module, config_module, names", MOVED, ids=[row[0] for row in MOVED])
def test_moved_configs_are_still_importable_where_they_were(module, config_module, names):
    """``from diffusionforge.backbones.unet import UNetConfig`` etc. keep working (re-exports)."""
    built, settings = (importlib.import_module(f"diffusionforge.{m}") for m in (module, config_module))
    for name in names:
        assert getattr(built, name) is getattr(settings, name)
