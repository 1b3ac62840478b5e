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
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cxrdist.artifacts import load_trained_model
from cxrdist.augment import eval_transform
from cxrdist.cli import add_batching, add_device, add_inputs, add_model, find_images, resolve_device
from shard_tools.cli import print_problem, run_main
from shard_tools.errors import EXIT_FAILED, EXIT_OK, InputError
from shard_tools.images import IMAGE_SUFFIXES, ImageError, load_gray


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
    add_model(p)
    add_inputs(p)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of one line per image")
    add_batching(p, batch_size=64)
    add_device(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    model, meta = load_trained_model(args.model, device)
    files, missing = find_images(args.inputs)
    for item, reason in missing:
        print_problem(f"{item}: {reason}", "skipped", "yellow")
    if not files:
        raise InputError(
            f"no images found in {' '.join(args.inputs)} (looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    records, failures = [], len(missing)
    for path, probs, error in predict_files(
        model, files, meta.image_size, meta.in_chans, args.batch_size, device
    ):
        if probs is None:
            failures += 1
            print_problem(error, "skipped", "yellow")  # the reason already names the file
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
        print_problem(f"{failures} input(s) could not be read; {len(records)} predicted", "error")
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(run_main(main))
