"""Convert a public dataset into training shards: python launch/prepare_data.py SOURCE --out DIR [options]."""

if __name__ == "__main__":
    import _deps  # noqa: F401 - first: without the project's packages, one line on how to get them

import argparse
import os
import sys
from pathlib import Path

from dcgan_dist.data.prepare import PrepareOptions, prepare
from dcgan_dist.data.sources import SOURCES, open_source
from dcgan_dist.errors import UserError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("source", choices=SOURCES)
    p.add_argument("--input", help="archive, folder or lmdb of the source (not for digits; fashion-mnist: default "
                                   "/usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist); for "
                                   "webdataset, shard paths or http(s)/s3/gs URLs with braces: "
                                   "'shards-{000000..000099}.tar'")
    p.add_argument("--label-field", help="webdataset: take the label from this field of each sample's .json "
                                         "(default: the .cls member)")
    p.add_argument("--out", type=Path, required=True, help="output folder for shards + manifest.json")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--channels", type=int, choices=(1, 3), help="default: the source's own")
    p.add_argument("--split", choices=("train", "test"), default="train", help="cifar10, mnist, fashion-mnist")
    p.add_argument("--classes", help="keep only these classes, names or indices: 'cat', 'Sneaker' or '3,5'")
    p.add_argument("--shard-size", type=int, default=8192, help="images per shard")
    p.add_argument("--chunk-size", type=int, default=256, help="images per tar sample")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="parallel decode/resize processes")
    p.add_argument("--limit", type=int, help="convert at most this many images")
    p.add_argument("--download", action="store_true",
                   help="cifar10, mnist, fashion-mnist: fetch into --input first (checked against the published "
                        "checksums)")
    p.add_argument("--mirror", help="mnist, fashion-mnist --download: fetch from this base URL instead")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        src = open_source(a.source, a.input, a.split, a.download, a.label_field, a.mirror)
        opts = PrepareOptions(a.source, a.input, a.split, a.resolution, a.channels,
                              a.classes, a.shard_size, a.chunk_size, a.limit, a.label_field)
        m = prepare(src, a.out, opts, workers=a.workers, overwrite=a.overwrite, progress=not a.quiet)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; re-run the same command to resume into {a.out}", file=sys.stderr)
        return 130
    st = m["_stats"]
    print(f"wrote {m['num_images']} images ({m['resolution']}px, {m['channels']}ch) in {len(m['shards'])} "
          f"shards to {a.out}; skipped {m['skipped']['count']} corrupt; "
          f"{st['new_images']} new images in {st['seconds']:.1f}s ({st['images_per_s']:.0f} img/s)")
    for key, why in m["skipped"]["items"][:5]:
        print(f"  skipped {key}: {why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
