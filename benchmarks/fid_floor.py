"""The FID/KID floor: real train split against real test split on the classifier features.

Every model FID in this project is reported beside this number.

    python benchmarks/fid_floor.py [CONFIG] [key=value ...]   (default: the fashion-ddpm preset's data)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from diffusionforge.config import load_config
from diffusionforge.evaluation.evaluate import real_floor


def main() -> None:
    args = sys.argv[1:]
    source = args[0] if args and "=" not in args[0] else "fashion-ddpm"
    overrides = args[1:] if args and "=" not in args[0] else args
    floor = real_floor(load_config(source, overrides))
    print(json.dumps(floor, indent=2))
    out = Path(__file__).parent / "results" / f"fid_floor_{floor['data']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(floor, indent=2) + "\n")


if __name__ == "__main__":
    main()
