"""Export a checkpoint's generator (G_ema by default) as a standalone, shareable model folder.

  python launch/export.py --checkpoint runs/digits/checkpoints/step_00002000 --out exported/digits
  python launch/export.py --checkpoint CKPT --out DIR --push-to-hub user/dcgan-digits    # where there is network

The folder holds model.safetensors and config.json (the huggingface_hub mixin convention), a model card
(README.md) with a sample grid and the run's metrics, and the training config. Load it in one line:

  from dcgan_dist.models import Generator; g = Generator.from_pretrained("exported/digits")
"""

if __name__ == "__main__":
    import _deps  # noqa: F401 - first: without the project's packages, one line on how to get them

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torchvision.utils import save_image

from dcgan_dist.errors import UserError, brief
from dcgan_dist.models import load_generator

CARD = """---
library_name: dcgan_dist
pipeline_tag: unconditional-image-generation
tags:
- dcgan
- gan
- unconditional-image-generation
- model_hub_mixin
- pytorch_model_hub_mixin
---

# {name}: a DCGAN generator

{which} of the run `{name}` at step {step}, trained with dcgan_dist on `{shards}`
({resolution} x {resolution} px, {channels} channel{plural}, latent size {latent}).

![samples](samples.png)

## Use

```python
import torch
from dcgan_dist.models import Generator

g = Generator.from_pretrained("{repo}")          # eval mode; the folder or a Hub repo id
z = torch.randn(16, g.latent)
images = (g(z) + 1) / 2                            # B x {channels} x {resolution} x {resolution} in [0, 1]
```

## Run

{metrics}

The full training configuration is in `training_config.toml`.
"""


def run_metrics(run_dir: Path, step: int) -> str:
    """The run's last logged losses and its FID/KID evaluations up to ``step``, as markdown."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return "No metrics.jsonl was found beside the checkpoint."
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("step", 0) <= step]
    scalars = [r for r in rows if "loss_d" in r]
    evals = [r for r in rows if "fid" in r]
    out = []
    if scalars:
        r = scalars[-1]
        out.append(f"At step {r['step']}: loss_d {r['loss_d']:.4f}, loss_g {r['loss_g']:.4f}, "
                   f"D(x) {r['d_real']:.3f}, D(G(z)) {r['d_fake']:.3f}.")
    if evals:
        out.append("\n| step | FID | KID |\n| --- | --- | --- |")
        out += [f"| {r['step']} | {r['fid']:.4f} | {r['kid']:.5f} |" for r in evals]
        out.append("\nFID/KID of G_ema as logged during training (features: see `eval.features` in the config).")
    return "\n".join(out) if out else "No metrics were logged up to this step."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="folder to write (must not exist)")
    p.add_argument("--raw", action="store_true", help="export the raw G, not G_ema")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is an earlier export (nothing else)")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this Hugging Face Hub repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    a = p.parse_args(argv)
    tmp = None                                           # ours: written whole, then renamed to --out
    try:
        g, which, cfg = load_generator(a.checkpoint, "cpu", a.raw)
        check_out(a.out, a.checkpoint, a.overwrite)
        state = json.loads((a.checkpoint / "train_state.json").read_text()) \
            if (a.checkpoint / "train_state.json").is_file() else {}
        step = int(state.get("step", 0))
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{a.out.name}.", suffix=".tmp", dir=a.out.parent))   # a new name
        umask = os.umask(0o22)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)                        # mkdtemp's 0700 would stay on --out after the rename
        g.save_pretrained(tmp)
        with torch.no_grad():
            z = torch.randn(64, g.latent, generator=torch.Generator().manual_seed(0))
            save_image((g(z) + 1) / 2, tmp / "samples.png", nrow=8)
        shutil.copy(a.checkpoint / "config.toml", tmp / "training_config.toml")
        (tmp / "README.md").write_text(CARD.format(
            name=cfg.name, which="G_ema (the moving average of G)" if which == "G_ema" else "The raw generator G",
            step=step, shards=cfg.data.shards, resolution=cfg.data.resolution, channels=cfg.data.channels,
            plural="" if cfg.data.channels == 1 else "s", latent=cfg.model.latent,
            repo=a.push_to_hub or a.out, metrics=run_metrics(a.checkpoint.parent.parent, step)))
        for f in tmp.iterdir():                          # safetensors writes 0600; the folder is meant to be shared
            f.chmod(0o666 & ~umask)
        if a.out.exists():
            shutil.rmtree(a.out)
        tmp.rename(a.out)
        print(f"exported {which} of {a.checkpoint} to {a.out}")
        if a.push_to_hub:
            push(a.out, a.push_to_hub, a.private)
            print(f"uploaded to https://huggingface.co/{a.push_to_hub}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:           # an unwritable or full --out: say so in one line
        print(f"error: --out {a.out}: cannot write ({e.strerror or e}: {e.filename or a.out})", file=sys.stderr)
        return 2
    finally:                       # whatever happened, leave no partial folder (only ours: a name mkdtemp made)
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


EXPORTED = {"README.md", "config.json", "model.safetensors", "samples.png", "training_config.toml"}


def check_out(out: Path, checkpoint: Path, overwrite: bool) -> None:
    """Refuse an --out that would lose data: one that exists (without --overwrite), holds the checkpoint being
    exported or a training run, or holds anything but a previous export's files (--overwrite replaces only that)."""
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise UserError(f"--out {out}: already exists; choose another folder or pass --overwrite")
    target, ckpt = out.resolve(), checkpoint.resolve()
    if target == ckpt or target in ckpt.parents:
        raise UserError(f"--out {out}: holds the checkpoint being exported ({checkpoint}); --overwrite would delete "
                        f"it: choose another folder")
    if out.is_dir() and any((out / name).exists() for name in ("checkpoints", "metrics.jsonl", ".lock")):
        raise UserError(f"--out {out}: holds a training run (checkpoints, metrics.jsonl); --overwrite would delete "
                        f"it: choose another folder")
    if out.is_symlink() or not out.is_dir():
        raise UserError(f"--out {out}: is not a folder (a file or a link); --overwrite replaces only an earlier "
                        f"export: choose another folder")
    others = sorted(p.name for p in out.iterdir() if p.name not in EXPORTED)
    if others:
        raise UserError(f"--out {out}: not a folder export.py wrote (it holds {', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}); --overwrite replaces only an earlier export: choose "
                        f"another folder")


def push(folder: Path, repo: str, private: bool) -> None:
    """Upload with the Hub's usual credentials (HF_TOKEN, or `hf auth login`); a failure is one line."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message="dcgan_dist export")
    except Exception as e:  # noqa: BLE001 - network, auth and HTTP errors come in many types
        raise UserError(f"--push-to-hub {repo}: upload failed ({type(e).__name__}: {brief(e, 200)}); the exported folder "
                        f"{folder} is complete: upload it later with `hf upload {repo} {folder}`") from None


if __name__ == "__main__":
    sys.exit(main())
