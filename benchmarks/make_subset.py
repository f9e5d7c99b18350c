"""Copy a small class-balanced CIFAR-10 JPEG subset for the GPU machine (which cannot see
~/.cache): the first N images per class of train/ and test/ into .benchdata/cifar-subset,
an ignored folder that `run` carries (about 6 MB for 500 + 100 per class).

    python -m benchmarks.make_subset [--src ~/.cache/cifar10-jpg] [--train 500] [--test 100]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=str(Path.home() / ".cache" / "cifar10-jpg"))
    ap.add_argument("--dst", default=".benchdata/cifar-subset")
    ap.add_argument("--train", type=int, default=500, help="images per class from train/")
    ap.add_argument("--test", type=int, default=100, help="images per class from test/")
    args = ap.parse_args(argv)
    src, dst = Path(args.src).expanduser(), Path(args.dst)
    for part, n in (("train", args.train), ("test", args.test)):
        for class_dir in sorted(p for p in (src / part).iterdir() if p.is_dir()):
            out = dst / part / class_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(class_dir.iterdir())[:n]:
                shutil.copy2(f, out / f.name)
    print(f"wrote {sum(1 for _ in dst.rglob('*.jpg'))} images under {dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
