"""Classify radiographs with a trained model: a run directory, a model directory, or an exported ONNX file.

    python -m cxrdist.predict RUN_OR_MODEL IMAGE_OR_DIR... [--json] [--tta] [--no-temperature]
                              [--positive COVID --threshold 0.42] [--batch-size N] [--device cpu|cuda]
    python -m cxrdist.predict model.onnx IMAGE_OR_DIR...      # onnxruntime only: torch is never imported

Each image is preprocessed exactly as `shard_tools.pack` did for training (`shard_tools.images.load_gray`:
decode, DICOM windowing, 8-bit gray, antialiased resize), then given the lung-focus preprocessing the model
was trained with (meta.json's preprocess.lung_focus, `cxrdist.lungs.focus`; an ONNX export has it in its
graph) and normalised as in evaluation. Folders are searched recursively for the suffixes in
`shard_tools.images.IMAGE_SUFFIXES`.

Probabilities are what the model reports after calibration: softmax(logits / T) with the temperature
fitted on the validation split at the end of training (`best/meta.json`; an ONNX export carries it inside
the graph), unless `--no-temperature`. `--tta` averages them over the image and its mirror image.
`--positive CLASS --threshold t` adds a decision per image: positive when p(CLASS) >= t, e.g. a threshold
read from the run's operating points (test_metrics.json) for a target specificity.

A file that cannot be read is reported on stderr and skipped; the others still get predictions, and the
exit status is 1 so scripts notice (README, "Exit codes").
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrdist.cli import add_batching, add_device, add_inputs, add_model, find_images
from shard_tools.cli import print_problem, run_main
from shard_tools.errors import EXIT_FAILED, EXIT_OK, InputError
from shard_tools.images import IMAGE_SUFFIXES, ImageError, load_gray


@dataclass(frozen=True)
class Classifier:
    """A model as predict sees it: uint8 gray (B, 1, S, S) -> float (B, K) probabilities."""

    classes: tuple[str, ...]
    image_size: int
    temperature: float | None  # applied inside `probs`
    probs: Callable[[np.ndarray], np.ndarray]


def torch_classifier(model_path: str, device_name: str | None, use_temperature: bool) -> Classifier:
    """A run's best/ (or a model directory) through PyTorch."""
    import torch

    from cxrdist.artifacts import load_trained_model
    from cxrdist.augment import eval_transform
    from cxrdist.cli import resolve_device
    from cxrdist.lungs import focus

    device = resolve_device(device_name)
    model, meta = load_trained_model(model_path, device)
    temperature = meta.temperature if use_temperature else None

    @torch.no_grad()
    def probs(images: np.ndarray) -> np.ndarray:
        x = focus(torch.from_numpy(images).to(device), meta.lung_focus)  # the model's preprocessing
        logits = model(eval_transform(x, meta.in_chans)).float()
        return (logits / (temperature or 1.0)).softmax(1).cpu().numpy()

    return Classifier(meta.classes, meta.image_size, temperature, probs)


def onnx_classifier(model_path: str, device_name: str | None, use_temperature: bool) -> Classifier:
    """An exported ONNX model through onnxruntime (`cxrdist.onnx_model`; no torch)."""
    from cxrdist.onnx_model import load_onnx

    clf = load_onnx(model_path, device=device_name or "cpu")
    if not use_temperature and clf.temperature is not None:
        raise InputError(
            f"{model_path} has temperature {clf.temperature:g} inside its graph; --no-temperature needs an "
            "export made with `python -m cxrdist.export ... --no-temperature`"
        )
    return Classifier(clf.classes, clf.image_size, clf.temperature, clf.predict)


def load_classifier(model_path: str, device_name: str | None, use_temperature: bool) -> Classifier:
    from cxrdist.onnx_model import is_onnx_file

    if is_onnx_file(model_path):
        return onnx_classifier(model_path, device_name, use_temperature)
    return torch_classifier(model_path, device_name, use_temperature)


def _chunks(items: list[Path], n: int) -> Iterator[list[Path]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def predict_files(
    clf: Classifier, files: list[Path], batch_size: int, tta: bool = False
) -> Iterator[tuple[Path, np.ndarray | None, str]]:
    """Yield (path, probabilities (K,) or None, the reason it could not be read) per file, in order."""
    for chunk in _chunks(files, batch_size):
        arrays, ok, results = [], [], {}
        for path in chunk:
            try:
                arrays.append(load_gray(path, clf.image_size))
                ok.append(path)
            except ImageError as e:
                results[path] = (None, str(e))  # the message names the file
        if arrays:
            images = np.stack(arrays)[:, None]  # uint8 (B, 1, S, S)
            probs = clf.probs(images)
            if tta:  # the mirror image, as evaluate's TTA: the mean of the two probability vectors
                probs = (probs + clf.probs(np.ascontiguousarray(images[..., ::-1]))) / 2
            for path, p in zip(ok, probs, strict=True):
                results[path] = (p, "")
        for path in chunk:
            yield (path, *results[path])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cxrdist.predict", description="Classify radiographs with a trained model."
    )
    add_model(p, onnx=True)
    add_inputs(p)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of one line per image")
    p.add_argument("--tta", action="store_true", help="average over the image and its mirror image")
    p.add_argument("--no-temperature", action="store_true", help="raw softmax: ignore the fitted temperature")
    p.add_argument(
        "--positive", metavar="CLASS", help="with --threshold: call each image positive or negative"
    )
    p.add_argument("--threshold", type=float, metavar="P", help="positive when p(CLASS) >= P (0..1)")
    add_batching(p, batch_size=64)
    add_device(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (args.positive is None) != (args.threshold is None):
        raise InputError("--positive and --threshold go together: e.g. --positive COVID --threshold 0.42")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise InputError(f"--threshold is a probability in [0, 1], got {args.threshold}")
    clf = load_classifier(args.model, args.device, not args.no_temperature)
    if args.positive is not None and args.positive not in clf.classes:
        raise InputError(
            f"--positive {args.positive!r} is not one of the model's classes {list(clf.classes)}"
        )
    files, missing = find_images(args.inputs)
    for item, reason in missing:
        print_problem(f"{item}: {reason}", "skipped", "yellow")
    if not files:
        raise InputError(
            f"no images found in {' '.join(args.inputs)} (looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    records, failures = [], len(missing)
    for path, probs, error in predict_files(clf, files, args.batch_size, args.tta):
        if probs is None:
            failures += 1
            print_problem(error, "skipped", "yellow")
            continue
        record = describe(path, probs, clf.classes, args.positive, args.threshold)
        records.append(record)
        if not args.json:
            print(line(record), flush=True)
    if args.json:
        print(json.dumps(records, indent=2))
    if failures:
        print_problem(f"{failures} input(s) could not be read; {len(records)} predicted", "error")
        return EXIT_FAILED
    return EXIT_OK


def describe(path: Path, probs: np.ndarray, classes, positive: str | None, threshold: float | None) -> dict:
    """One image's JSON record: the predicted class, every probability, and the decision if asked."""
    record = {
        "path": str(path),
        "predicted": classes[int(probs.argmax())],
        "probabilities": {c: round(float(p), 6) for c, p in zip(classes, probs, strict=True)},
    }
    if positive is not None:
        # Decided on the probability the record reports, so that the record agrees with itself: a
        # threshold copied from an earlier output (6 decimals) gives the same call for that image.
        p = round(float(probs[list(classes).index(positive)]), 6)
        record["decision"] = {
            "class": positive,
            "threshold": threshold,
            "probability": p,
            "call": "positive" if p >= threshold else "negative",
        }
    return record


def line(record: dict) -> str:
    probs_text = "  ".join(f"{c}={p:.3f}" for c, p in record["probabilities"].items())
    text = f"{record['path']}\t{record['predicted']}\t{probs_text}"
    if "decision" in record:
        d = record["decision"]
        sign = ">=" if d["call"] == "positive" else "<"
        text += f"\t{d['class']} {d['call']} ({d['probability']:.3f} {sign} {d['threshold']:g})"
    return text


if __name__ == "__main__":
    sys.exit(run_main(main))
