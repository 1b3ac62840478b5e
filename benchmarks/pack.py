"""Packing throughput with one worker and with all cores, on the same images in one run.

    python benchmarks/pack.py [--per-class 250] [--size 128] [--workers N] [--repeats 2]

Generates `--per-class` synthetic radiographs per class at 299 px (as the database) into a temporary
folder, then packs them at `--size` with `workers=1` (the baseline) and with `--workers` (default: all
cores), interleaved, best of `--repeats` each, and prints images/s and the speed-up. Writes nothing
into the repository.
The shards of both runs must be byte-identical; the script checks that too.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from shard_tools.pack import pack
from shard_tools.synth import generate


def time_pack(src: Path, out: Path, size: int, workers: int) -> tuple[float, dict]:
    """Wall time of one pack, in seconds, and its manifest."""
    start = time.perf_counter()
    manifest = pack(src, out, size=size, workers=workers, progress=False, force=True, command=[])
    return time.perf_counter() - start, manifest


def shard_hashes(manifest: dict) -> list[str]:
    return [s["sha256"] for split in manifest["splits"].values() for s in split["shards"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=250, help="images per class (default 250: 1000 in all)")
    ap.add_argument("--size", type=int, default=128, help="packed side in pixels (default 128)")
    ap.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="parallel case (default: all cores)"
    )
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs per case (default 2)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="cxrdist-bench-pack-") as tmp:
        src = Path(tmp) / "src"
        start = time.perf_counter()
        generate(src, per_class=args.per_class, size=299, seed=0, workers=args.workers)
        n = 4 * args.per_class
        print(f"synth: {n} images at 299 px in {time.perf_counter() - start:.2f} s ({args.workers} workers)")
        # Interleaved, best of each: load from other processes then hits both cases alike.
        one = many = float("inf")
        for _ in range(args.repeats):
            t, m1 = time_pack(src, Path(tmp) / "one", args.size, 1)
            one = min(one, t)
            t, m2 = time_pack(src, Path(tmp) / "many", args.size, args.workers)
            many = min(many, t)

    print(f"pack {n} images 299 -> {args.size} px, best of {args.repeats}, {os.cpu_count()} cores:")
    print(f"  workers=1:  {one:6.2f} s  {n / one:7.1f} images/s  (baseline)")
    print(f"  workers={args.workers}:  {many:6.2f} s  {n / many:7.1f} images/s  {one / many:.2f}x")
    if shard_hashes(m1) != shard_hashes(m2):
        print("error: the two runs wrote different shards", file=sys.stderr)
        return 1
    print("  shards byte-identical across worker counts: yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
