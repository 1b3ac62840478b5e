"""Input-pipeline throughput, in images/s, on the same images in one run, with ratios to the baseline.

    python benchmarks/loader.py [--per-class 250] [--workers 2] [--batch-size 64] [--device cpu]

Cases (one epoch each, over every image; best of --repeats):

  (a) the study's pipeline: torchvision ImageFolder + DataLoader on the original 299 px PNGs, with CPU
      transforms Resize(128), RandomRotation(10), RandomHorizontalFlip, ToTensor, Normalize;
  (b) cxrdist streaming from 128 px shards: uint8 batches decoded in the workers, copied to the device,
      converted to float there; (b+) the same plus cxrdist.augment's rotation + flip + normalisation;
  (c) cxrdist device cache, second epoch (the first fills nothing: the cache is filled once before);
      (c+) with the same augmentation;
  (d) raw tar reading with no decoding at all: the upper bound for anything that reads the shards.

Images come from `shard_tools.synth` (299 px, like the database), or from --src, and are packed at
128 px with `shard_tools.pack`, all into the train split, so every case sees the same images. On a
machine without a GPU the "device" is the CPU, so (b+)/(c+) pay for augmentation on the same cores as
the loader.
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

import torch

from cxrdist.data import DeviceCache, read_manifest, steps_per_epoch, to_device, train_batches
from shard_tools.schema import IMAGENET_MEAN, IMAGENET_STD


def prepare(
    work: Path, src: Path | None, per_class: int, image_size_px: int, workers: int
) -> tuple[Path, Path]:
    """(folder of class folders, shard folder) for the same images: `src`, or 299 px synthetic ones."""
    from shard_tools.synth import generate

    if src is None:
        src = work / "src"
        if not src.exists():
            generate(src, per_class=per_class, size=299, seed=0, workers=workers)
    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        try:
            from shard_tools.pack import pack
        except ImportError:
            pack_minimal(src, shards, image_size_px)
        else:
            # Everything in train: the streaming cases then read the images the baseline reads.
            pack(
                src,
                shards,
                size=image_size_px,
                split=(1.0, 0.0, 0.0),
                seed=0,
                workers=workers,
                progress=False,
            )
    return src, shards


def pack_minimal(src: Path, out: Path, image_size_px: int, shards: int = 8) -> None:
    """Stand-in for `shard_tools.pack` (same sample format, no split, dedupe or checksums)."""
    import json

    import webdataset as wds

    from shard_tools.images import encode_png, load_gray
    from shard_tools.schema import CLASSES, FORMAT_VERSION, sample_key, shard_name

    files = sorted((c, p) for c in CLASSES for p in (src / c).rglob("*.png"))
    out.mkdir(parents=True)
    entries = []
    for index in range(shards):
        part = files[index::shards]
        with wds.TarWriter(str(out / shard_name("train", index))) as sink:
            for c, p in part:
                gray = load_gray(p, image_size_px)
                key = sample_key(c, p.name)
                sink.write({"__key__": key, "png": encode_png(gray), "cls": str(CLASSES.index(c)).encode()})
        entries.append({"file": shard_name("train", index), "count": len(part)})
    counts = {c: sum(1 for fc, _ in files if fc == c) for c in CLASSES}
    manifest = {
        "format_version": FORMAT_VERSION,
        "classes": list(CLASSES),
        "image_size": image_size_px,
        "splits": {"train": {"count": len(files), "class_counts": counts, "shards": entries}},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))


Case = Callable[[], tuple[int, float]]  # one epoch -> (images, seconds measured)


def clocked(run: Callable[[], int]) -> Case:
    """A case timing the whole of `run`, which returns how many images it produced."""

    def case() -> tuple[int, float]:
        start = time.perf_counter()
        n = run()
        return n, time.perf_counter() - start

    return case


def consume(
    batches: Iterable, prepare_batch: Callable[[torch.Tensor], torch.Tensor], device: torch.device
) -> int:
    n = 0
    for batch in batches:
        x = prepare_batch(batch[0])
        n += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n


def study_pipeline(src: Path, batch_size: int, workers: int, image_size_px: int) -> Callable[[], int]:
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.Resize(image_size_px),
            transforms.RandomRotation(10),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = datasets.ImageFolder(str(src), transform=tf)

    def run() -> int:
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, num_workers=workers
        )
        return sum(images.shape[0] for images, _ in loader)

    return run


def raw_tar(urls: list[str]) -> Callable[[], int]:
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


def device_preparers(device: torch.device) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Host uint8 batch -> what the model would get: float only, or augmented and normalised."""

    def to_float(images: torch.Tensor) -> torch.Tensor:
        return to_device(images, device).float().div_(255)

    preparers = {"": to_float}
    try:
        from cxrdist.augment import train_transform
        from cxrdist.config import AugmentConfig
    except ImportError:  # augment not written yet: measure loading + float conversion only
        return preparers
    cfg = AugmentConfig(rotation_degrees=10.0, hflip_prob=0.5)  # the study's augmentation
    generator = torch.Generator(device=device).manual_seed(0)

    def augmented(images: torch.Tensor) -> torch.Tensor:
        return train_transform(to_device(images, device), cfg, generator, in_chans=3)

    preparers["+"] = augmented
    return preparers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=250, help="synthetic images per class (4 classes)")
    ap.add_argument(
        "--src", type=Path, default=None, help="real class folders to use instead of synthetic ones"
    )
    ap.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="loader workers, all cases"
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=128, help="training resolution in pixels")
    ap.add_argument("--repeats", type=int, default=2, help="epochs per case; the best is reported")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", type=Path, default=None, help="keep images and shards here (default: temp)")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads in the main process (default: 1 on CPU, where the loader workers hold the other "
        "cores and OpenMP threads competing with them stall; all cores on CUDA)",
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or (1 if device.type == "cpu" else os.cpu_count() or 1))

    with tempfile.TemporaryDirectory(prefix="cxrdist-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        src, shard_dir = prepare(work, args.src, args.per_class, args.image_size, args.workers)
        manifest = read_manifest(str(shard_dir))
        count = manifest.count("train")
        print(
            f"{count} images, {args.image_size} px shards, prepared in {time.perf_counter() - t0:.1f} s; "
            f"{args.workers} workers, batch {args.batch_size}, device {device}, "
            f"{torch.get_num_threads()} main-process threads, {os.cpu_count()} CPU cores, "
            f"torch {torch.__version__}"
        )
        steps = steps_per_epoch(count, args.batch_size)
        study = study_pipeline(src, args.batch_size, args.workers, args.image_size)
        cases: list[tuple[str, Case]] = [("(a) ImageFolder + CPU transforms (study)", clocked(study))]
        preparers = device_preparers(device)
        for suffix, prep in preparers.items():
            what = "uint8 -> device float" if suffix == "" else "+ device augment"

            def streaming(prep=prep, epoch=[0]) -> int:  # noqa: B006 - a new epoch each call
                epoch[0] += 1
                batches = train_batches(
                    manifest,
                    batch_size=args.batch_size,
                    steps=steps,
                    epoch=epoch[0],
                    seed=0,
                    rank=0,
                    world_size=1,
                    num_workers=args.workers,
                    shuffle_buffer=1000,
                    pin_memory=device.type == "cuda",
                )
                return consume(batches, prep, device)

            cases.append((f"(b{suffix}) cxrdist streaming, {what}", clocked(streaming)))

        start = time.perf_counter()
        cache = DeviceCache.load(manifest, "train", device, 1 << 40, args.workers)
        fill_s = time.perf_counter() - start
        print(f"device cache filled in {fill_s:.2f} s ({count / fill_s:.0f} images/s)")
        for suffix, prep in preparers.items():
            what = "uint8 -> float" if suffix == "" else "+ device augment"

            def cached(prep=prep) -> tuple[int, float]:
                # Epoch 1 is not timed, epoch 2 is: as in training, after the cache is warm.
                for epoch in (1, 2):
                    start = time.perf_counter()
                    batches = cache.train_batches(
                        batch_size=args.batch_size, steps=steps, epoch=epoch, seed=0, rank=0, world_size=1
                    )
                    n = consume(batches, prep, device)
                return n, time.perf_counter() - start

            cases.append((f"(c{suffix}) cxrdist device cache, epoch 2, {what}", cached))
        cases.append(("(d) raw tar reading (upper bound)", clocked(raw_tar(manifest.shard_urls("train")))))

        rows = []
        for name, run in cases:
            best = float("inf")
            for _ in range(args.repeats):
                n, seconds = run()
                best = min(best, seconds)
            rows.append((name, n / best))
            print(f"  {name}: {n / best:,.0f} images/s", file=sys.stderr)

    base = rows[0][1]
    width = max(len(name) for name, _ in rows)
    print(f"\n{'case':<{width}}  {'images/s':>10}  {'vs (a)':>7}")
    for name, rate in rows:
        print(f"{name:<{width}}  {rate:>10,.0f}  {rate / base:>6.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
