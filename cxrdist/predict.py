"""Classify radiographs with a trained model.

    python -m cxrdist.predict RUN_OR_MODEL IMAGE_OR_DIR... [--json] [--batch-size N] [--device cpu|cuda]

Each image is preprocessed exactly as `shard_tools.pack` did for training (decode, 8-bit grayscale,
antialiased resize: `shard_tools.images.load_gray`), then normalised as in evaluation. Folders are searched
recursively for .png/.jpg/.jpeg. A file that cannot be read is reported on stderr and skipped; the others
still get predictions, and the exit status is 1 so scripts notice.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from cxrdist.artifacts import ArtifactError, load_trained_model
from cxrdist.augment import eval_transform
from cxrdist.models import ModelError
from cxrdist.report import print_problem
from shard_tools.images import IMAGE_SUFFIXES, ImageError, load_gray


def find_images(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files named directly (any suffix) plus image files found under folders; and inputs that are missing."""
    files, missing = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            missing.append((item, "no such file or directory"))
    return files, missing


def _chunks(items: list[Path], n: int) -> Iterator[list[Path]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


@torch.no_grad()
def predict_files(
    model: torch.nn.Module,
    files: list[Path],
    image_size: int,
    in_chans: int,
    batch_size: int,
    device: torch.device,
) -> Iterator[tuple[Path, np.ndarray | None, str]]:
    """Yield (path, class probabilities or None, error message) per file, in input order."""
    for chunk in _chunks(files, batch_size):
        arrays, ok, results = [], [], {}
        for path in chunk:
            try:
                arrays.append(load_gray(path, image_size))
                ok.append(path)
            except ImageError as e:
                results[path] = (None, str(e))
        if arrays:
            images = torch.from_numpy(np.stack(arrays)).unsqueeze(1).to(device)  # uint8 (B,1,H,W)
            probs = model(eval_transform(images, in_chans)).float().softmax(1).cpu().numpy()
            for path, p in zip(ok, probs, strict=True):
                results[path] = (p, "")
        for path in chunk:
            yield (path, *results[path])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cxrdist.predict", description="Classify radiographs with a trained model."
    )
    p.add_argument(
        "model", help="run directory (uses best/) or a directory with model.safetensors + meta.json"
    )
    p.add_argument(
        "inputs", nargs="+", metavar="IMAGE_OR_DIR", help="images, or folders searched recursively"
    )
    p.add_argument("--json", action="store_true", help="print a JSON list instead of one line per image")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    err = Console(stderr=True, soft_wrap=True)
    try:
        model, meta = load_trained_model(args.model, torch.device(args.device))
    except (ArtifactError, ModelError) as e:
        print_problem(err, e)
        return 2
    files, missing = find_images(args.inputs)
    for item, reason in missing:
        print_problem(err, f"{item}: {reason}", "skipped", "yellow")
    if not files:
        err.print("[red]error:[/red] no images found (looked for .png, .jpg, .jpeg)")
        return 2
    records, failures = [], len(missing)
    for path, probs, error in predict_files(
        model, files, meta.image_size, meta.in_chans, args.batch_size, torch.device(args.device)
    ):
        if probs is None:
            failures += 1
            print_problem(err, f"{path}: {error}", "skipped", "yellow")
            continue
        predicted = meta.classes[int(probs.argmax())]
        record = {
            "path": str(path),
            "predicted": predicted,
            "probabilities": {c: round(float(p), 6) for c, p in zip(meta.classes, probs, strict=True)},
        }
        records.append(record)
        if not args.json:
            probs_text = "  ".join(f"{c}={p:.3f}" for c, p in record["probabilities"].items())
            print(f"{path}\t{predicted}\t{probs_text}", flush=True)
    if args.json:
        print(json.dumps(records, indent=2))
    if failures:
        err.print(f"{failures} input(s) could not be read; {len(records)} predicted")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
