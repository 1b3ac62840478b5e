"""Packing throughput with one worker and with all cores, on the same images in one run.

    python -m benchmarks.pack [--per-class 250] [--workers N] [--repeats 2] [--work DIR]

Draws `--per-class` synthetic radiographs per class at 299 px (as the database), then packs them at
128 px with `workers=1` (the baseline) and with `--workers` (default: all cores), interleaved, best of
`--repeats` each, and prints images/s and the speed-up. The shards of both runs must be byte-identical;
it checks that too. `python -m benchmarks` runs the same cases as its "pack" section.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    IMAGE_SIZE_PX,
    SOURCE_SIZE_PX,
    BenchError,
    best_rates,
    print_table,
    synthetic_source,
)
from shard_tools.cli import positive_int, run_main


def time_pack(src: Path, out: Path, workers: int) -> tuple[float, dict[str, Any]]:
    """Wall time of one pack at `IMAGE_SIZE_PX`, in seconds, and its manifest."""
    from shard_tools.pack import pack

    start = time.perf_counter()
    manifest = pack(src, out, size=IMAGE_SIZE_PX, workers=workers, progress=False, force=True, command=[])
    return time.perf_counter() - start, manifest


def shard_hashes(manifest: dict[str, Any]) -> list[str]:
    return [s["sha256"] for split in manifest["splits"].values() for s in split["shards"]]


def bench_pack(src: Path, work: Path, workers: int, repeats: int) -> dict[str, Any]:
    """Images/s of packing `src` with 1 worker (the baseline) and with `workers`; prints the table.

    Raises BenchError when the two write different shards: the output must not depend on the worker count.
    """
    manifests: dict[int, dict[str, Any]] = {}

    def case(n_workers: int):
        def run() -> tuple[int, float]:
            seconds, manifests[n_workers] = time_pack(src, work / f"pack-{n_workers}", n_workers)
            return sum(s["count"] for s in manifests[n_workers]["splits"].values()), seconds

        return run

    counts = (1, workers)
    rates = best_rates([case(n) for n in counts], repeats)
    images = sum(s["count"] for s in manifests[1]["splits"].values())
    identical = shard_hashes(manifests[1]) == shard_hashes(manifests[workers])
    for n in counts:
        shutil.rmtree(work / f"pack-{n}", ignore_errors=True)
    rows = [
        {"case": "1 worker (baseline)", "workers": 1, "images_per_s": rates[0]},
        {"case": f"{workers} workers", "workers": workers, "images_per_s": rates[1]},
    ]
    for r in rows:
        r["vs_baseline"] = r["images_per_s"] / rates[0]
    print_table(
        f"pack: {images} images {SOURCE_SIZE_PX} -> {IMAGE_SIZE_PX} px, best of {repeats}, "
        f"{os.cpu_count()} cores; shards byte-identical across worker counts: {'yes' if identical else 'NO'}",
        ["case", "images/s", "vs 1 worker"],
        [[r["case"], r["images_per_s"], f"{r['vs_baseline']:.2f}x"] for r in rows],
    )
    if not identical:
        raise BenchError(
            f"pack wrote different shards with 1 and {workers} workers: its output must not depend on it"
        )
    return {"images": images, "rows": rows, "byte_identical": identical}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--per-class", type=positive_int, default=250, help="images per class (default 250: 1000)"
    )
    ap.add_argument(
        "--workers", type=positive_int, default=os.cpu_count() or 1, help="parallel case (default: all cores)"
    )
    ap.add_argument("--repeats", type=positive_int, default=2, help="best of this many runs per case")
    ap.add_argument("--work", type=Path, default=None, help="keep the images here for reuse (default: temp)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cxrdist-bench-pack-") as tmp:
        work = args.work or Path(tmp)
        src, seconds = synthetic_source(work, args.per_class, SOURCE_SIZE_PX, seed=0, workers=args.workers)
        print(f"synth: {4 * args.per_class} images at {SOURCE_SIZE_PX} px in {seconds:.2f} s")
        bench_pack(src, work, args.workers, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
