"""PEP 562 lazy package attributes: a name is imported from its module on first use.

A package ``__init__`` that imported its torch modules eagerly would make
every import of a torch-free sibling (``backbones.config``, which loading a
config needs) pay for torch. Instead it lists where each public name lives::

    __getattr__, __dir__ = lazy_attributes(__name__, {"UNet": ".unet", "DiT": ".dit"})

and ``from diffusionforge.backbones import UNet`` imports ``backbones/unet.py``
then, once; the value is cached in the package.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_attributes(package: str, table: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``table`` maps a name to its (relative) module."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name], package), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
