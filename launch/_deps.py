"""The first import of every entry point: a Python without the project's packages (its virtual env not active,
or `pip install -e .` not run) gets one line saying how to get them, and exit 2, instead of a
ModuleNotFoundError traceback. The packages are only looked up, not imported (train.py installs its stop
handler before the heavy imports)."""

import importlib.util
import sys
from pathlib import Path

# dcgan_dist and the import names of its dependencies (pyproject.toml); psutil comes with accelerate
PACKAGES = ("dcgan_dist", "torch", "torchvision", "accelerate", "webdataset", "wandb", "numpy", "PIL", "lmdb",
            "sklearn", "tqdm", "imageio", "safetensors", "torchmetrics", "psutil")


def check() -> None:
    missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        root = Path(__file__).resolve().parents[1]
        here = Path.cwd().resolve() == root
        names = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        print(f"error: {sys.executable} cannot import {names} (the project's packages): activate the project's "
              f"virtual env (source {'.venv' if here else root / '.venv'}/bin/activate) or install the project into "
              f"this Python (pip install -e {'.' if here else root})", file=sys.stderr)
        sys.exit(2)


check()
