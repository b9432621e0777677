"""Start-up time of the commands that must answer at once: ``presets``, ``--help``, a config error.

None of them trains or samples, so none should pay for importing torch or
Lightning (about 2 s and 4 s on the 2-core machine). Each command runs
``--runs`` times (default 5) as a fresh process, both as ``python -m
diffusionforge.cli.main ...`` and through the installed ``dforge`` entry
point; the table gives the median wall time, the fastest run, and the exit
status (``presets`` and ``--help``: 0; ``train bad_key=1``: 2, one line on
stderr).

    python benchmarks/startup.py [--runs 5]

``tests/test_startup.py`` checks the behaviour (output, exit status, no
torch / lightning in ``sys.modules``); timing lives here, not in the tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = (("presets",), ("--help",), ("train", "bad_key=1"))
EXPECTED_STATUS = {"presets": 0, "--help": 0, "train bad_key=1": 2}


def launchers() -> dict[str, list[str]]:
    """How each command is started: the module under this interpreter, and the ``dforge`` script."""
    found = {"python -m diffusionforge.cli.main": [sys.executable, "-m", "diffusionforge.cli.main"]}
    script = shutil.which("dforge") or os.path.join(os.path.dirname(sys.executable), "dforge")
    if os.path.exists(script):
        found["dforge"] = [script]
    return found


def time_command(argv: list[str], runs: int) -> tuple[list[float], int]:
    """Wall seconds of ``runs`` fresh processes running ``argv``, and the last exit status."""
    times, status = [], 0
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
        status = done.returncode
    return times, status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per command (default 5)")
    args = parser.parse_args()
    print(f"{'launcher':36s} {'command':18s} {'median s':>9s} {'min s':>7s} {'exit':>5s}")
    for name, prefix in launchers().items():
        for command in COMMANDS:
            times, status = time_command(prefix + list(command), args.runs)
            label = " ".join(command)
            flag = "" if status == EXPECTED_STATUS[label] else f"  (expected {EXPECTED_STATUS[label]})"
            print(f"{name:36s} {label:18s} {statistics.median(times):9.3f} {min(times):7.3f} {status:5d}{flag}")


if __name__ == "__main__":
    main()
