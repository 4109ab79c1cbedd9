"""The summary section of tests/gpu/run.sh: summary.json and summary.md from what the sections wrote under OUT
(sections.jsonl, env.json, bench.json, e2e.json, fashion.json, log.txt). Usage: python tests/gpu/summarize.py OUT;
python tests/gpu/summarize.py --env FILE writes the environment (the setup section)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

H200_BF16_PEAK = 790e12          # FLOP/s measured on the lent H200 (an 8192^3 bf16 matrix product)
TARGET_IMG_S = 50_000            # issue 17: at 64 px, bf16 or fp16, per-GPU batch <= 512


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarize(out: Path) -> dict:
    sections = [json.loads(line) for line in (out / "sections.jsonl").read_text().splitlines()] \
        if (out / "sections.jsonl").exists() else []
    log = (out / "log.txt").read_text(errors="replace") if (out / "log.txt").exists() else ""
    pytest_line = next((m.group(0) for m in re.finditer(r"^=*\s*\d+ (passed|failed|skipped|deselected).*$", log,
                                                        re.M)), None)
    bench, e2e = read_json(out / "bench.json"), read_json(out / "e2e.json")
    s = {"env": read_json(out / "env.json"), "sections": sections, "pytest": pytest_line, "e2e": e2e,
         "fashion": read_json(out / "fashion.json")}
    if bench:
        rows = [r for r in bench["rows"] if r["images_per_s"]]
        ours = [r for r in rows if r["resolution"] == 64 and r["mode"] not in ("textbook", "shards")
                and r["precision"] in ("bf16", "fp16") and r["batch"] <= 512]
        book = [r for r in rows if r["resolution"] == 64 and r["mode"] == "textbook"]
        best = max(ours, key=lambda r: r["images_per_s"], default=None)
        s["bench"] = {"rows": len(bench["rows"]), "flops_per_image": bench["flops_per_image"], "best_64": best}
        if best:
            flops = bench["flops_per_image"].get("64")
            same = [r for r in book if r["batch"] == best["batch"]]
            s["bench"].update(
                target_img_s=TARGET_IMG_S, meets_target=best["images_per_s"] >= TARGET_IMG_S,
                vs_textbook_same_batch=best["images_per_s"] / same[0]["images_per_s"] if same else None,
                peak_fraction=flops * best["images_per_s"] / H200_BF16_PEAK if flops else None)
    return s


def markdown(s: dict) -> str:
    lines = ["# GPU check", "", f"env: `{json.dumps(s['env'])}`", "", "| section | rc | seconds | budget |",
             "|---|---|---|---|"]
    lines += [f"| {x['section']} | {x['rc']}{' (timed out)' if x['timed_out'] else ''} | {x['seconds']} | "
              f"{x['budget_s']} |" for x in s["sections"]]
    lines += ["", f"pytest -m gpu: {s['pytest']}", ""]
    b = s.get("bench")
    if b:
        lines.append(f"bench: {b['rows']} rows; FLOPs per image per step: "
                     f"{ {k: f'{v / 1e9:.2f} G' for k, v in b['flops_per_image'].items()} }")
        if b.get("best_64"):
            r = b["best_64"]
            lines.append(f"best 64 px (bf16/fp16, batch <= 512): {r['images_per_s']:,.0f} img/s ({r['precision']}, "
                         f"batch {r['batch']}, channels_last {r['channels_last']}, {r['mode']}); target "
                         f"{b['target_img_s']:,}: {'met' if b['meets_target'] else 'NOT met'}; vs textbook at the same "
                         f"batch: {b['vs_textbook_same_batch'] or 0:.2f}x; fraction of bf16 peak: "
                         f"{b['peak_fraction'] or 0:.1%}")
    if s.get("e2e"):
        e = s["e2e"]
        lines.append(f"end to end: exit {e['exit_code']}, {e['images_per_s_median'] or 0:,.0f} img/s (median), peak "
                     f"GPU memory {e['gpu_mem_gb_peak']} GiB, checkpoint {e['checkpoint_s']} s, grid {e['grid_s']} s, "
                     f"W&B {e['wandb']}")
    f = s.get("fashion")
    if f and "G_ema" in f:
        g, floor = f["G_ema"], f.get("floor") or {}
        lines.append(f"Fashion-MNIST: {f['epochs']} epochs ({f['steps']} steps) in {f['train_wall_s']} s, "
                     f"{f['images_per_s_median'] or 0:,.0f} img/s (median); G_ema FID {g['fid']:.4f}, precision "
                     f"{g['precision']:.3f}, recall {g['recall']:.3f} ({g['n_fake']} vs {g['n_real']} test images); "
                     f"floor FID {floor.get('fid', float('nan')):.4f} ({f.get('fid_over_floor') or 0:.1f}x)")
    elif f:
        lines.append(f"Fashion-MNIST: incomplete: {json.dumps(f)[:300]}")
    return "\n".join(lines) + "\n"


def environment() -> dict:
    """The device and the versions the check ran with (the setup section)."""
    import importlib
    import platform

    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (rehearsal)",
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    for m in ("accelerate", "webdataset", "wandb", "torchmetrics"):
        try:
            info[m] = importlib.import_module(m).__version__
        except Exception as e:  # noqa: BLE001 - report it, the sections that need it will fail visibly
            info[m] = f"missing ({type(e).__name__})"
    return info


if __name__ == "__main__":
    if sys.argv[1] == "--env":
        Path(sys.argv[2]).write_text(json.dumps(environment(), indent=1))
        print(json.dumps(environment()))
        sys.exit(0)
    out = Path(sys.argv[1])
    summary = summarize(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
