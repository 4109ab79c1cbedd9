"""Plot FID over steps from one or more runs' metrics.jsonl (for docs/; needs matplotlib, not a dependency).

  python docs/plot_fid.py runs/digits/metrics.jsonl:G_ema [other/metrics.jsonl:label ...] --out docs/digits_fid.png
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="metrics.jsonl[:label] or a JSON list of {step, fid}[:label]")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="FID (digit-classifier features) of the digits demo")
    a = p.parse_args()
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for spec in a.runs:
        path, _, label = spec.partition(":")
        text = open(path).read()
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines()]
        pts = sorted((r["step"], r["fid"]) for r in rows if "fid" in r)
        ax.plot([s for s, _ in pts], [f for _, f in pts], marker="o", label=label or path)
    ax.set_xlabel("step")
    ax.set_ylabel("FID")
    ax.set_yscale("log")
    ax.set_title(a.title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out)


if __name__ == "__main__":
    main()
