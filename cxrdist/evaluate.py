"""Exact evaluation of a model on one split of the shards, on any number of ranks, with the numbers a
clinical reader asks for: 95% intervals, calibration, operating points, test-time augmentation, subgroups.

    python -m cxrdist.evaluate RUN_OR_MODEL --shards DIR_OR_URL [--split test] [--tta] [--subgroups FILE.csv]
                               [--out FILE.json [--force]] [--mixed-precision auto|no|bf16|fp16]
    accelerate launch -m cxrdist.evaluate ...            # any number of ranks, identical results

The forward passes run in the precision the model was trained, validated and tested in (best/meta.json's
`mixed_precision`), so evaluate repeats training's test numbers; `--mixed-precision` picks another, and the
output says which was used. An existing `--out` or plot of it is replaced only with `--force`.

Library use (the training loop calls the first two every epoch, the third once at the end)::

    scores = evaluate_split(model, manifest, "val", ScoringSettings(...), rank=r, world_size=w)
    metrics = split_metrics(scores, manifest.classes, probabilities(scores))
    report = full_metrics(scores, manifest.classes, MetricOptions(temperature=T, resamples=1000, seed=0))

Contract: every rank evaluates the shards `eval_batches` assigns it (possibly none), then all ranks join
one gather of the per-sample logits, labels and keys (`SplitScores`). The scores are sorted by sample key,
so they are the same arrays on every rank and for any number of ranks, and every sample of the split is
counted exactly once (checked against the manifest). Everything after that is a pure function of the
scores, computed identically on every rank (the main process writes): probabilities (temperature-scaled
when the model carries a temperature, averaged with the mirrored image under TTA), the metrics of
`cxrdist.stats.metrics.summarize`, bootstrap intervals (`cxrdist.stats.uncertainty`), calibration before and
after the temperature (`cxrdist.stats.calibration`), operating points (`cxrdist.stats.operating_points`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from cxrdist.artifacts import ModelMeta, find_model_dir, load_trained_model
from cxrdist.augment import eval_transform
from cxrdist.cli import add_batching, add_model, check_writable_file, refuse_existing
from cxrdist.data import Manifest, eval_batches, read_manifest, sample_paths, to_device
from cxrdist.device_cache import DeviceCache
from cxrdist.distributed import gather_objects, gather_rows, is_main_launch_process
from cxrdist.lungs import focus
from cxrdist.stats.metrics import summarize
from cxrdist.stats.registry import HEADLINE
from shard_tools.cli import non_negative_int, run_main, stdout_console
from shard_tools.errors import CxrdistError, InputError
from shard_tools.files import atomic_write_json
from shard_tools.locks import output_lock


class EvalError(CxrdistError):
    """The evaluation did not see exactly the samples the manifest lists. Exit 1."""


@dataclass(frozen=True, kw_only=True)
class ScoringSettings:
    """How `evaluate_split` runs the model over a split: where, in what batches, at what precision, and
    whether the mirrored image is scored too. None of it changes which samples are scored."""

    device: torch.device
    batch_size: int = 128
    num_workers: int = 2
    in_chans: int = 3
    channels_last: bool = False
    autocast_dtype: torch.dtype | None = None  # bf16/fp16 autocast; None = fp32
    tta_hflip: bool = False  # also score the mirrored image (test-time augmentation)
    lung_focus: str = "off"  # the model's preprocessing (meta.json preprocess.lung_focus; cxrdist.lungs)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # mixed_precision -> autocast ("no": fp32)


def model_scoring(
    meta: ModelMeta, device: torch.device, precision: str, *, batch_size: int, num_workers: int, tta=False
) -> ScoringSettings:
    """How to score a saved model on `device`: its input channels and preprocessing (`meta`), in
    `precision` ("no", "bf16" or "fp16", as `eval_precision` chose), the mirrored image too with `tta`."""
    return ScoringSettings(
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        in_chans=meta.in_chans,
        autocast_dtype=AUTOCAST_DTYPES.get(precision),
        tta_hflip=tta,
        lung_focus=meta.lung_focus,
    )


@dataclass(frozen=True)
class SplitScores:
    """A model's outputs on one split: every sample once, sorted by key (the same on any rank count).

    keys: the samples' WebDataset keys; labels: int64 (N,) ids into the manifest's classes;
    logits: float32 (N, K); logits_flipped: float32 (N, K) of the horizontally mirrored image, or None.
    """

    keys: tuple[str, ...]
    labels: np.ndarray
    logits: np.ndarray
    logits_flipped: np.ndarray | None = None

    def subset(self, index: np.ndarray) -> SplitScores:
        flipped = None if self.logits_flipped is None else self.logits_flipped[index]
        return SplitScores(
            tuple(self.keys[i] for i in index), self.labels[index], self.logits[index], flipped
        )


class Views(Protocol):
    """Several versions of every batch, scored in evaluate_split's one pass (the shortcut audit's
    occlusions, `cxrdist.audit`): each batch is read and decoded once, then every view is scored."""

    names: tuple[str, ...]  # one per view, in the order __call__ returns them
    masks: bool  # the views need the samples' lung masks (shards whose manifest says "masks": true)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor | None) -> list[torch.Tensor]:
        """uint8 (B, 1, H, W) on the device (and bool (B, 1, H, W) masks, or None) -> one uint8
        (B, 1, H, W) batch per view, before the model's preprocessing and normalisation."""
        ...


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate_split(
    model: torch.nn.Module,
    manifest: Manifest,
    split: str,
    settings: ScoringSettings,
    *,
    rank: int = 0,
    world_size: int = 1,
    cache: DeviceCache | None = None,
    views: Views | None = None,
) -> SplitScores:
    """The model's `SplitScores` on `split`, identical on every rank (see the module docstring).

    With `cache` (the whole split already on the device, `DeviceCache.load`) the batches are slices of it
    instead of being read and decoded from the shards again: the same samples, the same scores.
    With `views` (V of them), each batch is scored as every view makes it, and `logits` is float32
    (N, V * K): view v's logits in columns v*K .. (v+1)*K - 1.

    `model` must be the unwrapped module: a DDP wrapper would broadcast buffers in forward, and that
    deadlocks when ranks run different numbers of eval batches (a rank may have no shard at all).
    Raises `EvalError` when the samples evaluated differ from the manifest's count.
    """
    was_training = model.training
    model.eval()
    masks = views is not None and views.masks
    k = len(manifest.classes) * (len(views.names) if views is not None else 1)
    device = settings.device
    logit_parts, flipped_parts, label_parts, keys = [], [], [], []
    if cache is not None and not masks:  # the cache holds no masks
        batches = cache.eval_batches(batch_size=settings.batch_size, rank=rank, world_size=world_size)
    else:
        batches = eval_batches(
            manifest,
            split,
            batch_size=settings.batch_size,
            rank=rank,
            world_size=world_size,
            num_workers=settings.num_workers,
            masks=masks,
        )
    for images, labels, batch_keys, *batch_masks in batches:
        images, labels = to_device((images, labels), device)
        versions = [images]
        if views is not None:  # occlusion first, then the model's own preprocessing
            versions = views(images, to_device(batch_masks[0], device) if batch_masks else None)
        xs = [
            eval_transform(focus(v, settings.lung_focus), settings.in_chans, settings.channels_last)
            for v in versions
        ]
        with _autocast(device, settings.autocast_dtype):
            logit_parts.append(torch.cat([model(x).float() for x in xs], dim=1))
            if settings.tta_hflip:
                flipped_parts.append(torch.cat([model(x.flip(3)).float() for x in xs], dim=1))
        label_parts.append(labels)
        keys += batch_keys
    model.train(was_training)

    # One gather each, on every rank, whatever it evaluated.
    empty = torch.zeros(0, k, device=device)
    logits = gather_rows(torch.cat(logit_parts) if logit_parts else empty).cpu()
    flipped = gather_rows(torch.cat(flipped_parts) if flipped_parts else empty).cpu()
    labels = gather_rows(
        torch.cat(label_parts) if label_parts else torch.zeros(0, dtype=torch.int64, device=device)
    ).cpu()
    keys = gather_objects(keys)
    expected = manifest.count(split)
    if len(keys) != expected or len(set(keys)) != len(keys):
        raise EvalError(
            f"evaluated {len(keys)} samples ({len(set(keys))} distinct) of split '{split}' but the "
            f"manifest at {manifest.source} lists {expected}. The shards do not match their manifest: run "
            "`python -m shard_tools.verify`."
        )
    order = np.argsort(np.array(keys, dtype=object), kind="stable")
    return SplitScores(
        keys=tuple(keys[i] for i in order),
        labels=labels.numpy()[order],
        logits=logits.numpy()[order],
        logits_flipped=flipped.numpy()[order] if settings.tta_hflip else None,
    )


# --------------------------------------------------------------------------------------------- metrics


def probabilities(scores: SplitScores, temperature: float | None = None, tta: bool = False) -> np.ndarray:
    """float64 (N, K): softmax(logits / T), averaged with the mirrored image's when `tta`.

    Dividing by T never changes a row's argmax, so accuracy and the confusion matrix do not depend on it.
    """
    from cxrdist.stats.calibration import apply_temperature

    t = temperature or 1.0
    probs = apply_temperature(scores.logits, t)
    if tta:
        if scores.logits_flipped is None:
            raise ValueError("test-time augmentation needs scores evaluated with tta_hflip=True")
        probs = (probs + apply_temperature(scores.logits_flipped, t)) / 2
    return probs


def split_metrics(scores: SplitScores, classes: tuple[str, ...] | list[str], probs: np.ndarray) -> dict:
    """`cxrdist.stats.metrics.summarize` of these probabilities (predictions are their argmax), plus `loss`
    (mean negative log-likelihood). Cheap: what the training loop logs every epoch."""
    k = len(classes)
    labels = torch.from_numpy(scores.labels)
    preds = torch.from_numpy(probs.argmax(1))
    cm = torch.bincount(labels * k + preds, minlength=k * k).reshape(k, k)
    metrics = summarize(cm, classes, torch.from_numpy(probs), labels)
    picked = probs[np.arange(len(scores.labels)), scores.labels] if len(scores.labels) else np.ones(1)
    metrics["loss"] = float(-np.log(np.clip(picked, 1e-12, None)).mean())
    return metrics


@dataclass(frozen=True, kw_only=True)
class MetricOptions:
    """What `full_metrics` derives from the scores beyond the plain metrics: which probabilities it reports
    (temperature, TTA), the bootstrap's size and seed, and the subgroups to break the metrics down by."""

    temperature: float | None = None  # from the model (fitted on val); None = raw softmax
    tta: bool = False  # report the TTA probabilities, and the plain ones beside them
    resamples: int = 1000  # bootstrap resamples for the 95% intervals; 0 = no intervals
    seed: int = 0  # the bootstrap's seed: same seed, same intervals
    subgroups: dict[str, str] | None = None  # sample key -> subgroup name


# The names these had before: importable, and still in use.
EvalSettings = ScoringSettings
Options = MetricOptions

COMPACT = HEADLINE  # the metrics `without_tta` keeps


def full_metrics(scores: SplitScores, classes: tuple[str, ...] | list[str], options: MetricOptions) -> dict:
    """Everything the report and test_metrics.json carry, as one JSON-able dict:

    the metrics of `split_metrics` on the probabilities the model reports (temperature-scaled, TTA-averaged
    as asked); `intervals` (95%, stratified bootstrap); `calibration` (ECE, Brier, NLL before and after the
    temperature, reliability bins, of the plain view); `operating_points` (per class, with intervals);
    `probabilities` (how they were made); with TTA, `without_tta` (the plain view's headline metrics and
    intervals); with subgroups, `subgroups` (per subgroup: metrics and intervals).
    """
    from cxrdist.stats.calibration import calibration_report
    from cxrdist.stats.operating_points import operating_points
    from cxrdist.stats.uncertainty import bootstrap_intervals

    probs = probabilities(scores, options.temperature, options.tta)
    metrics = split_metrics(scores, classes, probs)

    def intervals(p: np.ndarray, labels: np.ndarray) -> dict | None:
        return bootstrap_intervals(p, labels, classes, resamples=options.resamples, seed=options.seed)

    metrics["intervals"] = intervals(probs, scores.labels)
    metrics["probabilities"] = {
        "temperature": options.temperature,
        "tta_hflip": options.tta,
        "source": "softmax(logits / temperature)"
        + (", averaged with the mirrored image" if options.tta else ""),
    }
    metrics["calibration"] = calibration_report(scores.logits, scores.labels, options.temperature)
    if options.temperature is not None:
        metrics["calibration"]["temperature_fitted_on"] = "val"  # the only split cxrdist.train fits it on
    metrics["operating_points"] = operating_points(
        probs, scores.labels, classes, resamples=options.resamples, seed=options.seed
    )
    if options.tta:
        plain = probabilities(scores, options.temperature, tta=False)
        plain_metrics = split_metrics(scores, classes, plain)
        plain_intervals = intervals(plain, scores.labels)
        metrics["without_tta"] = {
            **{m: plain_metrics[m] for m in (*COMPACT, "loss")},
            "macro_roc_auc": plain_metrics["macro"]["roc_auc"],
            "intervals": {m: plain_intervals[m] for m in COMPACT} if plain_intervals else None,
        }
    if options.subgroups is not None:
        metrics["subgroups"] = subgroup_metrics(scores, classes, probs, options)
    return metrics


def subgroup_metrics(scores: SplitScores, classes, probs: np.ndarray, options: MetricOptions) -> dict:
    """Per subgroup (a hospital, an age band, ...): the full metrics of its samples, with intervals."""
    from cxrdist.stats.uncertainty import bootstrap_intervals

    names = np.array([options.subgroups.get(key, "(not listed)") for key in scores.keys], dtype=object)
    out = {}
    for name in sorted(set(names.tolist())):
        index = np.flatnonzero(names == name)
        part = scores.subset(index)
        m = split_metrics(part, classes, probs[index])
        m.pop("confusion_matrix", None)
        m["intervals"] = bootstrap_intervals(
            probs[index], part.labels, classes, resamples=options.resamples, seed=options.seed
        )
        out[name] = m
    return out


def read_subgroups(path: Path, manifest: Manifest, split: str) -> dict[str, str]:
    """`--subgroups FILE.csv` (header `file,subgroup`) as sample key -> subgroup. `file` names an image as
    `shard_tools.pack --groups` does (its file name, or its path relative to the source folder)."""
    from shard_tools.groups import read_groups

    paths = sample_paths(manifest, split)  # key -> path relative to the packed source folder
    by_rel = {rel: key for key, rel in paths.items()}
    table = read_groups(path, list(by_rel), column="subgroup", option="--subgroups")
    if not table.groups:
        raise InputError(f"--subgroups {path}: no row names an image of the {split} split")
    return {by_rel[rel]: name for rel, name in table.groups.items()}


# ------------------------------------------------------------------------------------------------- CLI


def check_compatible(meta: ModelMeta, manifest: Manifest) -> None:
    """A model is only ever evaluated with the class order and image size it was trained on."""
    if tuple(meta.classes) != tuple(manifest.classes):
        raise InputError(
            f"the model was trained on classes {list(meta.classes)} but the shards at {manifest.source} "
            f"list {list(manifest.classes)}: labels would be misread. Evaluate on shards packed with the "
            "same classes (shard_tools.pack --classes)."
        )
    if meta.image_size != manifest.image_size:
        raise InputError(
            f"the model was trained at {meta.image_size} px but the shards at {manifest.source} are "
            f"{manifest.image_size} px. Pack them with --size {meta.image_size}."
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cxrdist.evaluate",
        description="Exact per-class evaluation of a trained model on one split of packed shards, with 95% "
        "intervals, calibration and operating points. Runs alone or under `accelerate launch` with any "
        "number of processes, with identical results.",
    )
    add_model(p)
    p.add_argument("--shards", required=True, help="directory or http(s) URL holding manifest.json")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", type=Path, help="metrics JSON to write (default: MODEL/eval_<split>.json)")
    p.add_argument("--tta", action="store_true", help="average over the image and its mirror; report both")
    p.add_argument(
        "--bootstrap", type=non_negative_int, default=1000, help="resamples for the 95%% intervals (0 = none)"
    )
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="bootstrap seed (same seed, same intervals)"
    )
    p.add_argument(
        "--no-temperature", action="store_true", help="raw softmax: ignore the model's fitted temperature"
    )
    p.add_argument("--subgroups", type=Path, help="CSV with header file,subgroup: metrics per subgroup")
    add_batching(p, batch_size=128, workers=2)
    p.add_argument(
        "--mixed-precision",
        choices=("auto", "no", "bf16", "fp16"),
        default="auto",
        help="autocast precision of the forward passes: auto (default) = the one the model was trained, "
        "validated and tested in (best/meta.json), so the numbers match training's test; no = fp32",
    )
    p.add_argument(
        "--force", action="store_true", help="replace --out and its plots if they exist (else: refused)"
    )
    return p.parse_args(argv)


PRECISION_NAMES = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}


def eval_precision(requested: str, meta: ModelMeta, cuda: bool) -> tuple[str, str]:
    """The precision to evaluate in ("no" = fp32, "bf16", "fp16") for `--mixed-precision requested`, and
    why, in words for the output. "auto" is the model's own (meta.json), as training tested it."""
    tested = PRECISION_NAMES[meta.mixed_precision]
    if requested != "auto":  # main refused fp16 without CUDA
        if requested == meta.mixed_precision:
            return requested, f"--mixed-precision {requested}, as training tested the model"
        return requested, f"--mixed-precision {requested}; training tested the model in {tested}"
    if meta.mixed_precision == "fp16" and not cuda:
        return "no", "the model was tested in fp16 autocast, which needs a CUDA GPU: numbers may differ"
    return meta.mixed_precision, "as training validated and tested the model (best/meta.json)"


def plot_paths(out: Path) -> dict[str, Path]:
    """The pictures written beside the metrics JSON `out`."""
    return {kind: out.with_name(f"{out.stem}_{kind}.png") for kind in ("confusion", "roc", "reliability")}


def write_plots(
    metrics: dict, scores: SplitScores, options: MetricOptions, classes, paths: dict[str, Path], title: str
) -> list[Path]:
    """The confusion matrix, ROC curves with the operating points, and the reliability diagram (before and
    after the temperature) of `full_metrics(scores, classes, options)`, at `paths["confusion" | "roc" |
    "reliability"]`. Returns the files written."""
    from cxrdist.plots import plot_confusion, plot_reliability, plot_roc
    from cxrdist.stats.operating_points import roc_curves

    probs = probabilities(scores, options.temperature, options.tta)
    calibration = metrics["calibration"]
    after = calibration["after"]["bins"] if calibration.get("after") else None
    return [
        plot_confusion(metrics["confusion_matrix"], classes, paths["confusion"], title=title),
        plot_roc(roc_curves(probs, scores.labels, classes), paths["roc"], title=title),
        plot_reliability(calibration["before"]["bins"], paths["reliability"], title=title, bins_after=after),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or find_model_dir(args.model) / f"eval_{args.split}.json"
    # One writer per output (`shard_tools.locks`); under a launcher, the job's main process holds it.
    with output_lock(out, f"evaluate --out {out}") if is_main_launch_process() else contextlib.nullcontext():
        return evaluate_main(args, out)


def evaluate_main(args: argparse.Namespace, out: Path) -> int:
    from accelerate import PartialState

    from cxrdist.tables import print_metrics_table

    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise InputError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this machine")
    refuse_existing([out, *plot_paths(out).values()], args.force)  # no-clobber, before any work
    check_writable_file(out)  # before the evaluation, so a long one is never thrown away
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU-only hosts: gloo ranks
    model, meta = load_trained_model(args.model, state.device)
    manifest = read_manifest(args.shards)
    check_compatible(meta, manifest)
    precision, precision_why = eval_precision(args.mixed_precision, meta, torch.cuda.is_available())
    subgroups = read_subgroups(args.subgroups, manifest, args.split) if args.subgroups else None
    settings = model_scoring(
        meta, state.device, precision, batch_size=args.batch_size, num_workers=args.num_workers, tta=args.tta
    )
    scores = evaluate_split(
        model, manifest, args.split, settings, rank=state.process_index, world_size=state.num_processes
    )
    if state.is_main_process:
        options = Options(
            temperature=None if args.no_temperature else meta.temperature,
            tta=args.tta,
            resamples=args.bootstrap,
            seed=args.seed,
            subgroups=subgroups,
        )
        metrics = full_metrics(scores, manifest.classes, options)
        metrics.update(split=args.split, shards=manifest.source, model=str(find_model_dir(args.model)))
        metrics["precision"] = {"mixed_precision": precision, "model_tested_in": meta.mixed_precision}
        title = f"{args.split} split, n={metrics['num_samples']}"
        atomic_write_json(out, metrics)
        plots = plot_paths(out)
        written = [out, *write_plots(metrics, scores, options, manifest.classes, plots, title)]
        console = stdout_console()
        print_metrics_table(
            metrics, manifest.classes, console, title=f"{args.split} split of {manifest.source}"
        )
        console.print(f"precision: {PRECISION_NAMES[precision]} ({precision_why})", highlight=False)
        for path in written:
            console.print(f"  {path}", highlight=False)
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
