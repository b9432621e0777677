"""The values Lightning's ``Trainer`` accepts for the ``trainer.*`` string fields.

``TrainerConfig.__post_init__`` checks them with ``check_trainer_values`` so a
typo such as ``trainer.precision=bogus`` is a one-line config error before
any data is read or a run directory is made, not a Lightning traceback after.
The lists mirror Lightning 2.x (``lightning.fabric.connector``, the
accelerator and strategy registries); ``tests/test_malformed_inputs.py``
compares them with the installed Lightning. Lightning is not imported here:
a config error must answer at once.
"""

from __future__ import annotations

import re
from typing import Any

# Lightning's precision strings and their aliases, plus our "auto" (bf16-mixed where native, else 32-true)
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16", "bf16-true", "16-mixed", "16", "16-true",
              "64-true", "64", "transformer-engine", "transformer-engine-float16")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
_DDP_FLAVOURS = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")
STRATEGIES = ("auto", *_DDP_FLAVOURS,
              *(f"{d}_find_unused_parameters_{b}" for d in _DDP_FLAVOURS for b in ("false", "true")),
              "deepspeed", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
              "deepspeed_stage_3", "deepspeed_stage_3_offload", "deepspeed_stage_3_offload_nvme",
              "fsdp", "fsdp_cpu_offload", "single_device", "single_xla", "xla_debug", "xla", "single_tpu")
# accepted by Lightning, refused here: Lightning's FSDP1 with CPU offload (trainer.strategy=fsdp is FSDP2, sharding.py)
UNSUPPORTED_STRATEGIES = {"fsdp_cpu_offload": "(Lightning's FSDP1) is not supported; use trainer.strategy=fsdp"}
MAX_TIME_FORMAT = re.compile(r"^\d+:\d+:\d+:\d+$")  # DD:HH:MM:SS, as Lightning's Timer parses it
DEVICE_LIST = re.compile(r"^\d+(,\d+)*,?$")  # GPU indices "0,1" (or "0," for device 0 only)


def _one_of(key: str, value: Any, accepted: tuple[str, ...], lower: bool = False) -> None:
    if (str(value).lower() if lower else str(value)) not in accepted:
        raise ValueError(f"trainer.{key}: {value!r} is not one of {', '.join(accepted)}")


def _check_devices(devices: str, accelerator: str) -> None:
    text = str(devices).strip()
    if text == "auto":
        return
    if re.fullmatch(r"-?\d+", text):
        count = int(text)
        if count >= 1 or (count == -1 and accelerator != "cpu"):
            return
    elif DEVICE_LIST.match(text) and accelerator != "cpu":
        return
    cpu = " (accelerator=cpu takes a count)" if accelerator == "cpu" else ", -1 (all) or a list of indices \"0,1\""
    raise ValueError(f"trainer.devices: {devices!r} is not 'auto', a number of devices >= 1{cpu}")


def _at_least(config: Any, minimum: int, *keys: str) -> None:
    for key in keys:
        value = getattr(config, key)
        if value < minimum:
            raise ValueError(f"trainer.{key}: must be >= {minimum}, got {value}")


def check_trainer_values(config: Any) -> None:
    """Raise ValueError naming the first ``trainer.*`` field Lightning would reject."""
    _one_of("precision", config.precision, PRECISIONS)
    _one_of("accelerator", config.accelerator, ACCELERATORS)
    _one_of("strategy", config.strategy, STRATEGIES, lower=True)  # Lightning lowercases it
    if str(config.strategy).lower() in UNSUPPORTED_STRATEGIES:
        raise ValueError(f"trainer.strategy: {config.strategy!r} {UNSUPPORTED_STRATEGIES[str(config.strategy).lower()]}")
    _check_devices(config.devices, config.accelerator)
    for key in ("max_time", "time_budget"):
        value = getattr(config, key, None)
        if value is not None and not MAX_TIME_FORMAT.match(str(value).strip()):
            raise ValueError(f"trainer.{key}: {value!r} is not a duration DD:HH:MM:SS "
                             "(e.g. 00:01:30:00 for 90 minutes) or null")
    if config.max_steps < -1:
        raise ValueError(f"trainer.max_steps: must be >= 0 (or -1 for no limit), got {config.max_steps}")
    _at_least(config, 1, "num_nodes", "accumulate_grad_batches", "val_every_n_steps")
    _at_least(config, 0, "log_every_n_steps", "checkpoint_every_n_steps", "limit_val_batches",
              "max_nonfinite_steps")
