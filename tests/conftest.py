"""Shared fixtures: one tiny trained run reused by the CLI tests."""

from pathlib import Path

import pytest

from diffusionforge.cli.main import main


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """`dforge train tiny` into a fresh run directory (about 20 optimizer steps)."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "tiny", f"run_dir={run_dir}", "--no-progress"]) == 0
    return run_dir
