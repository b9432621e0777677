"""What machine a run is on, and the precision `trainer.precision=auto` picks there.

`dforge train` prints ``machine_line`` once at start and records
``Machine.as_dict`` in ``train_summary.json``, so a figure can always be traced
to the kind of machine that produced it: CPUs with native bf16 (AVX512-BF16 or
AMX) train about 1.5x faster in bf16-mixed, CPUs without it (AVX2 only, most
laptops) emulate bf16 about 100x slower and must train in fp32.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch


@dataclass(frozen=True)
class Machine:
    device: str          # "cpu" or the CUDA device name
    cpu: str             # CPU model name
    threads: int         # intra-op threads torch uses
    isa: str             # the vector ISA torch's CPU kernels use (AVX2, AVX512, ...)
    native_bf16: bool    # bf16 matmuls run natively (CUDA, AVX512-BF16 or AMX)

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else the platform's answer)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def native_bf16() -> bool:
    """Whether this machine runs bf16 matmuls natively (CUDA, or a CPU with AVX512-BF16/AMX).

    oneDNN's answer follows ``ONEDNN_MAX_CPU_ISA``, so capping the ISA at AVX2
    (to reproduce a laptop) also turns native bf16 off here.
    """
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def describe_machine(accelerator: str = "auto") -> Machine:
    cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    return Machine(device=torch.cuda.get_device_name(0) if cuda else "cpu", cpu=cpu_model(),
                   threads=torch.get_num_threads(), isa=torch.backends.cpu.get_cpu_capability(),
                   native_bf16=native_bf16())


def choose_precision(requested: str, machine: Machine) -> tuple[str, str]:
    """(Lightning precision, why): 'auto' -> bf16-mixed where bf16 is native, else 32-true."""
    if requested != "auto":
        return requested, "as configured"
    if machine.native_bf16:
        return "bf16-mixed", "auto: bf16 is native here"
    return "32-true", "auto: no native bf16 here (it would be emulated, ~100x slower)"


def machine_line(machine: Machine, precision: str, reason: str, budget: Optional[str]) -> str:
    """One line for the start of `dforge train`."""
    where = "CPU" if machine.device == "cpu" else f"GPU {machine.device}, CPU"
    bf16 = "native bf16" if machine.native_bf16 else "no native bf16"
    return (f"machine: {where} {machine.cpu}, {machine.threads} threads, {machine.isa}, {bf16}; "
            f"precision {precision} ({reason}); time budget {budget or 'none'}")
