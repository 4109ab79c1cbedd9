"""Export a checkpoint's generator (G_ema by default) as a standalone, shareable model folder.

  python launch/export.py --checkpoint runs/digits/checkpoints/step_00002000 --out exported/digits
  python launch/export.py --checkpoint CKPT --out DIR --push-to-hub user/dcgan-digits    # where there is network

The folder holds model.safetensors and config.json (the huggingface_hub mixin convention), a model card
(README.md) with a sample grid and the run's metrics, and the training config. Load it in one line:

  from dcgan_dist.models import Generator; g = Generator.from_pretrained("exported/digits")
"""

import argparse
import json
import shutil
import sys
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
    p.add_argument("--out", type=Path, required=True, help="folder to write (must not exist, or --overwrite)")
    p.add_argument("--raw", action="store_true", help="export the raw G, not G_ema")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this Hugging Face Hub repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    a = p.parse_args(argv)
    tmp = a.out.with_name(a.out.name + ".tmp")          # written whole, then renamed to --out
    try:
        g, which, cfg = load_generator(a.checkpoint, "cpu", a.raw)
        if a.out.exists() and not a.overwrite:
            raise UserError(f"--out {a.out}: already exists; choose another folder or pass --overwrite")
        state = json.loads((a.checkpoint / "train_state.json").read_text()) \
            if (a.checkpoint / "train_state.json").is_file() else {}
        step = int(state.get("step", 0))
        shutil.rmtree(tmp, ignore_errors=True)
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
    except OSError as e:           # an unwritable or full --out: say so in one line, leave no partial folder
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"error: --out {a.out}: cannot write ({e.strerror or e}: {e.filename or a.out})", file=sys.stderr)
        return 2
    return 0


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
