"""Input-pipeline throughput, in images/s, on the same images in one run, with ratios to the baseline.

    python -m benchmarks.loader [--per-class 250] [--src DIR] [--workers 2] [--batch-size 64] [--device cpu]

Cases, each one epoch over the train split (70% of the images), best of --repeats, interleaved:

  (a) the study's pipeline: torchvision ImageFolder + DataLoader on the original PNGs (299 px when
      synthetic), with CPU transforms Resize(128), RandomRotation(10), RandomHorizontalFlip, ToTensor,
      Normalize: the baseline;
  (b) cxrdist streaming from 128 px shards: uint8 batches decoded in the workers, copied to the device,
      converted to float there; (b+) the same plus cxrdist.augment's rotation + flip + normalisation;
  (c) cxrdist device cache, epoch 2 (epoch 1 runs untimed before it, as in training; the cache itself is
      filled once, before every case); (c+) with the same augmentation;
  (d) raw tar reading with no decoding at all: the upper bound for anything that reads the shards.

Every case uses the training defaults of `cxrdist.config.DataConfig` (shuffle buffer, workers) unless told
otherwise. On a machine without a GPU the "device" is the CPU, so (b+)/(c+) pay for augmentation on the
same cores as the loader. `python -m benchmarks` runs the same cases as its "loader" section.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    IMAGE_SIZE_PX,
    Case,
    Dataset,
    best_rates,
    clocked,
    default_device,
    image_folder,
    print_table,
    sync,
    synthetic_dataset,
)
from shard_tools.cli import non_negative_int, positive_int, run_main
from shard_tools.schema import IMAGENET_MEAN, IMAGENET_STD

Prepare = Callable[[torch.Tensor], torch.Tensor]  # host or device uint8 batch -> what the model would get


def consume(batches: Iterable, prepare: Prepare, device: torch.device) -> int:
    """Run `prepare` over every batch's images; the number of images."""
    n = 0
    for batch in batches:
        n += prepare(batch[0]).shape[0]
    sync(device)
    return n


def study_pipeline(folder: Path, batch_size: int, workers: int) -> Callable[[], int]:
    """(a): the study's ImageFolder + DataLoader with its CPU transforms."""
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.Resize(IMAGE_SIZE_PX),
            transforms.RandomRotation(10),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = datasets.ImageFolder(str(folder), transform=tf)

    def run() -> int:
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, num_workers=workers
        )
        return sum(images.shape[0] for images, _ in loader)

    return run


def raw_tar(urls: list[str]) -> Callable[[], int]:
    """(d): every member of every shard read, nothing decoded."""

    def run() -> int:
        n = 0
        for url in urls:
            with tarfile.open(url, mode="r|") as tar:
                for member in tar:
                    data = tar.extractfile(member)
                    if data is not None:
                        data.read()
                        n += member.name.endswith(".png")
        return n

    return run


def device_preparers(device: torch.device) -> dict[str, Prepare]:
    """Host uint8 batch -> float on the device ("") or augmented and normalised there ("+")."""
    from cxrdist.augment import train_transform
    from cxrdist.config import AugmentConfig
    from cxrdist.data import to_device

    cfg = AugmentConfig(rotation_degrees=10.0, hflip_prob=0.5)  # the study's augmentation
    generator = torch.Generator(device=device).manual_seed(0)

    def to_float(images: torch.Tensor) -> torch.Tensor:
        return to_device(images, device).float().div_(255)

    def augmented(images: torch.Tensor) -> torch.Tensor:
        return train_transform(to_device(images, device), cfg, generator, in_chans=3)

    return {"": to_float, "+": augmented}


def loader_cases(
    data: Dataset, device: torch.device, batch_size: int, workers: int
) -> tuple[list[tuple[str, Case]], float]:
    """The cases (a)-(d), named, and the seconds the device cache took to fill."""
    from cxrdist.config import DataConfig
    from cxrdist.data import read_manifest, steps_per_epoch, train_batches
    from cxrdist.device_cache import DeviceCache

    manifest = read_manifest(str(data.shards))
    steps = steps_per_epoch(manifest.count("train"), batch_size)
    cases: list[tuple[str, Case]] = [
        (
            "(a) ImageFolder + CPU transforms (the study)",
            clocked(study_pipeline(image_folder(data, "train"), batch_size, workers)),
        )
    ]
    preparers = device_preparers(device)
    epochs = iter(range(1, 1 << 30))  # a new epoch, so new shard draws, each run
    for suffix, prepare in preparers.items():

        def streaming(prepare: Prepare = prepare) -> int:
            batches = train_batches(
                manifest,
                batch_size=batch_size,
                steps=steps,
                epoch=next(epochs),
                seed=0,
                rank=0,
                world_size=1,
                num_workers=workers,
                shuffle_buffer=DataConfig().shuffle_buffer,
                pin_memory=device.type == "cuda",
            )
            return consume(batches, prepare, device)

        what = "uint8 -> float on the device" if not suffix else "+ rotation/flip/normalise on the device"
        cases.append((f"(b{suffix}) cxrdist streaming, {what}", clocked(streaming)))

    start = time.perf_counter()
    cache = DeviceCache.load(manifest, "train", device, 1 << 40, workers)
    fill_s = time.perf_counter() - start
    for suffix, prepare in preparers.items():

        def cached(prepare: Prepare = prepare) -> tuple[int, float]:
            for epoch in (1, 2):  # only the last is timed
                start = time.perf_counter()
                batches = cache.train_batches(
                    batch_size=batch_size, steps=steps, epoch=epoch, seed=0, rank=0, world_size=1
                )
                n = consume(batches, prepare, device)
            return n, time.perf_counter() - start

        what = "uint8 -> float" if not suffix else "+ rotation/flip/normalise"
        cases.append((f"(c{suffix}) cxrdist device cache, epoch 2, {what}", cached))
    cases.append(
        ("(d) raw tar reading, no decoding (upper bound)", clocked(raw_tar(manifest.shard_urls("train"))))
    )
    return cases, fill_s


def bench_loader(
    data: Dataset,
    device: torch.device,
    batch_size: int,
    workers: int,
    repeats: int,
    threads: int | None = None,
) -> dict[str, Any]:
    """Images/s of each case and its ratio to (a); prints the table.

    `threads`: torch threads in this process while measuring (default: 1 on a CPU, where the loader
    workers hold the other cores and OpenMP threads competing with them stall; all cores on CUDA).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads or (1 if device.type == "cpu" else os.cpu_count() or 1))
    try:
        cases, fill_s = loader_cases(data, device, batch_size, workers)
        rates = best_rates([case for _, case in cases], repeats)
    finally:
        torch.set_num_threads(before)
    rows = [
        {"case": name, "images_per_s": rate, "vs_baseline": rate / rates[0]}
        for (name, _), rate in zip(cases, rates)
    ]
    images = data.counts["train"]
    print_table(
        f"loader: {images} images, {IMAGE_SIZE_PX} px, batch {batch_size}, {workers} workers, "
        f"device {device}, "
        f"best of {repeats}; device cache filled in {fill_s:.2f} s ({images / fill_s:,.0f} images/s)",
        ["case", "images/s", "vs (a)"],
        [[r["case"], r["images_per_s"], f"{r['vs_baseline']:.1f}x"] for r in rows],
    )
    return {
        "images": images,
        "batch_size": batch_size,
        "workers": workers,
        "cache_fill_s": fill_s,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    from cxrdist.config import DataConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--per-class", type=positive_int, default=250, help="synthetic images per class (4 classes)"
    )
    ap.add_argument(
        "--src", type=Path, default=None, help="real class folders to use instead of synthetic ones"
    )
    ap.add_argument(
        "--workers", type=non_negative_int, default=DataConfig().num_workers, help="loader workers"
    )
    ap.add_argument("--batch-size", type=positive_int, default=64)
    ap.add_argument("--repeats", type=positive_int, default=2, help="runs per case; the best is reported")
    ap.add_argument("--device", default=str(default_device()))
    ap.add_argument("--work", type=Path, default=None, help="keep images and shards here (default: temp)")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch threads in this process")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="cxrdist-bench-loader-") as tmp:
        work = args.work or Path(tmp)
        start = time.perf_counter()
        data = synthetic_dataset(work, args.per_class, src=args.src)
        print(
            f"{sum(data.counts.values())} images, split {data.counts}, "
            f"ready in {time.perf_counter() - start:.1f} s; "
            f"{os.cpu_count()} CPU cores, torch {torch.__version__}"
        )
        bench_loader(data, device, args.batch_size, args.workers, args.repeats, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
