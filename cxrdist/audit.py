"""Does the model read the lungs? The shortcut audit: the test split scored as it is and with parts of
every image hidden, with 95% intervals, the chance level and a verdict.

    python -m cxrdist.audit RUN_OR_MODEL --shards DIR_OR_URL [--split test] [--out FILE] [--force]
    accelerate launch -m cxrdist.audit ...            # any number of ranks, identical results

`cxrdist.train` runs it on every rank after the test split and writes RUN/audit.json, audit_examples.png
and audit_visible.png; training's summary, the demo and this command end with the verdict's line.

Method. One pass over the split (`cxrdist.evaluate.evaluate_split` with the `Occlusions` views): every
batch is read and decoded once; then, on the device, each variant sets part of every image to flat grey
(`cxrdist.lungs.hide`, `FILL`, which normalises to about zero), before the model's own preprocessing
(`lungs.focus`, meta.json's preprocess.lung_focus) and normalisation. Nothing is written to disk.

    intact        the images as they are
    lungs_hidden  the lung fields hidden
    lungs_only    everything but the lung fields hidden
    border_only   everything but a 12% frame hidden (`lungs.BORDER_FRACTION`)

Plain occlusion is the test that needs nothing but the model. Stronger ones in the literature, such as
the GAN-made counterfactuals of DeGrave et al. (2021), need a generative model and are out of reach here;
a "border hidden" variant would only ask lungs_only's question less sharply, so none is added. The lung
fields are each sample's own mask when the shards carry them (manifest ``"masks": true``), else the
two-ellipse template of `cxrdist.lungs` (``mask_source`` says which). Scores are gathered once and
sorted by key as evaluation's are, so every number, intervals included, is the same on 1 or N ranks.

Verdict. Chance is 1/K for balanced accuracy (K = classes with test samples) and the largest class's share
for accuracy. A shortcut is suspected when either holds:

(a) with the lungs hidden, the lower bound of balanced accuracy's 95% interval exceeds chance + `MARGIN`;
(b) with only the border visible, a class keeps at least `KEEP_SHARE` of its intact recall AND its
    one-vs-rest Youden J (recall + specificity - 1) is clearly positive: recall's lower bound plus
    specificity's lower bound minus 1 exceeds `MARGIN`. Each bound holds at 97.5%, so together they bound
    J at 95% or more (conservative). The J condition tells a model that recognises the class from the frame
    apart from a collapse: a model that sends every occluded image to one class keeps that class's
    recall near 1 but its specificity near 0, J near 0 (the issue's ResNet18 pushing to COVID, recall 0.94).

`MARGIN` = 0.10 (absolute): hiding the lungs leaves real anatomy in view (heart, mediastinum, diaphragm;
and with the template, the parts of a lung it misses), so a model that reads the chest may stay a little
above chance; 0.10 absorbs that, while the study CNN's 72.5% accuracy with lungs hidden (chance 33%) is far
beyond it. With resamples = 0 the point estimates stand in for the bounds, and the reasons say so. A
model that is not clearly above chance on intact images gets no verdict either way ("inconclusive").

Visible region (`visible_region`): the pixels that can change the logits at all, the support of
|d logits / d pixel| summed over `VISIBLE_PROBES` random images. The study CNN's last pool keeps the
top-left 8x8 of its 11x11 map, so it never sees about the bottom and right fifth of a 128 px image.

audit.json (the contract with the report)::

    split, num_samples, classes, classes_scored (classes with test samples),
    mask_source "shards" | "template", mask_note, chance {balanced_accuracy, accuracy}, margin,
    intervals {method, resamples, seed, level},
    variants {name: {title, description, metrics: M}} in VARIANTS order, M = split_metrics + "intervals"
    verdict {shortcut_suspected: bool, line: str (one sentence), reasons: [str]},
    visible_region {fraction, note, image}, examples_image (file names beside audit.json),
    gradcam {inside_share_mean, region "mask" | "template"} | null (explain's summary, when drawn),
    per_source {source: M without confusion_matrix} | null (provenance "source", else "group"),
    provenance {model, shards, mixed_precision, lung_focus, cxrdist_version, git_commit, torch_version}
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from cxrdist.artifacts import find_model_dir, load_trained_model, provenance
from cxrdist.augment import normalize_stats
from cxrdist.cli import add_batching, add_model, check_writable_file, refuse_existing
from cxrdist.data import Manifest, eval_batches, read_manifest, sample_provenance
from cxrdist.evaluate import (
    MetricOptions,
    SplitScores,
    check_compatible,
    eval_precision,
    evaluate_split,
    model_scoring,
    probabilities,
    split_metrics,
    subgroup_metrics,
)
from cxrdist.lungs import BORDER_FRACTION, border_mask, focus_values, hide, template_mask
from cxrdist.rundir import (
    AUDIT_EXAMPLES_PNG,
    AUDIT_FILE,
    AUDIT_VISIBLE_PNG,
    EXPLAIN_SUMMARY,
    GRADCAM_DIR,
    TEST_METRICS_FILE,
)
from cxrdist.uncertainty import METHOD, bootstrap_intervals
from shard_tools.cli import non_negative_int, run_main, stdout_console
from shard_tools.errors import InputError
from shard_tools.files import atomic_write_bytes, atomic_write_json

MARGIN = 0.10  # above chance, in balanced accuracy or Youden J (see the module docstring)
KEEP_SHARE = 0.5  # "keeps most of its recall": at least this share of the intact recall
VISIBLE_PROBES = 32  # random images whose gradients map the visible region
VARIANTS = {  # name: (title, description); the order of audit.json and the report
    "intact": ("as they are", "the test images unchanged"),
    "lungs_hidden": ("lungs hidden", "every lung-field pixel set to flat grey"),
    "lungs_only": ("only the lungs visible", "everything outside the lung fields set to flat grey"),
    "border_only": (
        "only the border visible",
        f"everything but a {BORDER_FRACTION:.0%} frame on each edge set to flat grey",
    ),
}


@dataclass(frozen=True)
class Occlusions:
    """The audit's `cxrdist.evaluate.Views`: every batch under each of `VARIANTS`, on its device."""

    masks: bool  # use each sample's lung mask (else the template)
    names: tuple[str, ...] = tuple(VARIANTS)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor | None) -> list[torch.Tensor]:
        h, w = images.shape[-2:]
        lungs = masks if masks is not None else template_mask(h, w, images.device)
        frame = border_mask(h, w, BORDER_FRACTION, images.device)
        return [images, hide(images, lungs), hide(images, ~lungs), hide(images, ~frame)]


def score_variants(
    model: torch.nn.Module, manifest: Manifest, split: str, settings, *, rank: int = 0, world_size: int = 1
) -> dict[str, SplitScores]:
    """Per variant, the model's scores on `split`: one pass, one gather, on every rank (a collective:
    call it on all ranks). `settings` is evaluate's (its lung_focus applies after the occlusion)."""
    views = Occlusions(masks=manifest.has_masks)
    settings = dataclasses.replace(settings, tta_hflip=False)
    scores = evaluate_split(model, manifest, split, settings, rank=rank, world_size=world_size, views=views)
    k = len(manifest.classes)
    return {
        name: SplitScores(scores.keys, scores.labels, scores.logits[:, i * k : (i + 1) * k])
        for i, name in enumerate(views.names)
    }


# --------------------------------------------------------------------------------- metrics and verdict


@dataclass(frozen=True)
class AuditOptions:
    """How the audit turns scores into numbers: as test_metrics.json does (cfg.eval, cfg.run.seed)."""

    temperature: float | None = None  # the model's, fitted on val: probabilities as the test metrics
    resamples: int = 1000
    seed: int = 0


def chance_levels(labels: np.ndarray, k: int) -> dict:
    """Balanced accuracy of a constant guess (1 / classes present) and accuracy of the majority guess."""
    counts = np.bincount(labels, minlength=k)
    present = int((counts > 0).sum())
    return {
        "balanced_accuracy": 1 / present if present else None,
        "accuracy": float(counts.max() / counts.sum()) if counts.sum() else None,
    }


def variant_metrics(scores: SplitScores, classes, options: AuditOptions) -> dict:
    """split_metrics (with the confusion matrix) and bootstrap intervals, as in test_metrics.json."""
    probs = probabilities(scores, options.temperature)
    metrics = split_metrics(scores, classes, probs)
    metrics["intervals"] = bootstrap_intervals(
        probs, scores.labels, classes, resamples=options.resamples, seed=options.seed
    )
    return metrics


def _low(metrics: dict, value: float | None, *path: str) -> float | None:
    """The lower bound of a metric's interval; the point estimate when there are no intervals."""
    node = metrics.get("intervals")
    for key in path:
        node = None if node is None else node.get(key)
    return node[0] if node else value


def _ci(metrics: dict, value: float, *path: str) -> str:
    node = metrics.get("intervals")
    for key in path:
        node = None if node is None else node.get(key)
    return f"{value:.2f} (95% CI {node[0]:.2f}-{node[1]:.2f})" if node else f"{value:.2f} (no interval)"


def verdict(
    variants: dict[str, dict], chance: dict, classes, mask_source: str, lung_focus: str = "off"
) -> dict:
    """The flag, its one-line sentence and its reasons, from the variants' metrics (module docstring)."""
    intact, hidden, border = (variants[v]["metrics"] for v in ("intact", "lungs_hidden", "border_only"))
    level = chance["balanced_accuracy"]
    where = "lung fields: per-image masks" if mask_source == "shards" else "lung fields: the template"
    if level is None or intact["balanced_accuracy"] is None:
        return {"shortcut_suspected": False, "line": "No audit: the split has no samples.", "reasons": []}
    if lung_focus == "mask":
        # Its preprocessing greys everything outside the template, so "lungs hidden" and "border only" both
        # reach it as one flat grey image: chance there is automatic, and says nothing either way.
        return {
            "shortcut_suspected": False,
            "line": (
                "Not testable by occlusion: this model sees only the template's lung fields (lung_focus = "
                "mask), so with the lungs hidden or only the border visible it gets a blank image; a "
                "shortcut can still come from inside those fields (markers, tubes, a child's smaller chest)."
            ),
            "reasons": [],
        }
    reasons, clauses, kept = [], [], []
    ba = hidden["balanced_accuracy"]
    if _low(hidden, ba, "balanced_accuracy") > level + MARGIN:
        clauses.append(
            f"with the lungs hidden it still reaches balanced accuracy {_ci(hidden, ba, 'balanced_accuracy')}"
            f", above chance {level:.2f} + margin {MARGIN:.2f}"
        )
        reasons.append(clauses[0])
    for name in classes:
        now, before = border["per_class"][name], intact["per_class"][name]
        if now["recall"] is None or before["recall"] is None or now["specificity"] is None:
            continue
        recall_low = _low(border, now["recall"], "per_class", name, "recall")
        spec_low = _low(border, now["specificity"], "per_class", name, "specificity")
        if now["recall"] >= KEEP_SHARE * before["recall"] and recall_low + spec_low - 1 > MARGIN:
            kept.append(f"{name} (recall {now['recall']:.2f}; {before['recall']:.2f} intact)")
            reasons.append(
                f"with only the border visible {name} keeps recall {now['recall']:.2f} of "
                f"{before['recall']:.2f} intact, at specificity {now['specificity']:.2f}"
            )
    if kept:
        names = kept[0] if len(kept) == 1 else f"{', '.join(kept[:-1])} and {kept[-1]}"
        one = len(kept) == 1
        clauses.append(
            f"with only the border visible {names} keep{'s' * one} most of {'its' if one else 'their'} recall"
        )
    if reasons:
        line = (
            f"Shortcut suspected: {'; and '.join(clauses)}, so this model's accuracy is no evidence that it "
            f"reads the lungs ({where})."
        )
    elif _low(intact, intact["balanced_accuracy"], "balanced_accuracy") <= level + MARGIN:
        line = (
            f"Inconclusive: even on intact images balanced accuracy is "
            f"{_ci(intact, intact['balanced_accuracy'], 'balanced_accuracy')}, not clearly above chance "
            f"{level:.2f}."
        )
    else:
        line = (
            f"No shortcut found: with the lungs hidden balanced accuracy falls to "
            f"{_ci(hidden, ba, 'balanced_accuracy')}, chance being {level:.2f}, and no class keeps its "
            f"recall from the border alone ({where})."
        )
    return {"shortcut_suspected": bool(reasons), "line": line, "reasons": reasons}


def mask_note(mask_source: str) -> str:
    if mask_source == "shards":
        return "The lung fields are each image's own mask, stored in the shards beside it."
    return (
        "The shards hold no lung masks, so the lung fields are cxrdist.lungs' two-ellipse template: a rough "
        "stand-in that misses parts of some lungs and covers some mediastinum; pack the database's masks "
        "for per-image fields."
    )


def audit_report(
    variant_scores: dict[str, SplitScores],
    classes,
    options: AuditOptions,
    mask_source: str,
    lung_focus: str = "off",
):
    """audit.json's numbers and verdict (without visible_region, gradcam, per_source, provenance): a pure
    function of the gathered scores, the same on every rank."""
    labels = variant_scores["intact"].labels
    counts = np.bincount(labels, minlength=len(classes))
    chance = chance_levels(labels, len(classes))
    variants = {
        name: {"title": title, "description": description}
        | {"metrics": variant_metrics(variant_scores[name], classes, options)}
        for name, (title, description) in VARIANTS.items()
    }
    return {
        "split": None,  # set by finish_audit
        "num_samples": int(len(labels)),
        "classes": list(classes),
        "classes_scored": [c for c, n in zip(classes, counts) if n > 0],
        "mask_source": mask_source,
        "mask_note": mask_note(mask_source),
        "chance": chance,
        "margin": MARGIN,
        "intervals": {"method": METHOD, "resamples": options.resamples, "seed": options.seed, "level": 0.95},
        "variants": variants,
        "verdict": verdict(variants, chance, classes, mask_source, lung_focus),
    }


def per_source(scores: SplitScores, manifest: Manifest, split: str, classes, options: AuditOptions):
    """Intact metrics with intervals per source (provenance ``source``, else ``group``), or None when
    pack recorded neither. Reads the shards' provenance members: main process only."""
    records = sample_provenance(manifest, split)
    sources = {k: r.get("source") or r.get("group") for k, r in records.items()}
    if not any(sources.values()):
        return None
    named = {k: str(v) if v else "(unknown)" for k, v in sources.items()}
    probs = probabilities(scores, options.temperature)
    settings = MetricOptions(subgroups=named, resamples=options.resamples, seed=options.seed)
    return subgroup_metrics(scores, classes, probs, settings)


# ----------------------------------------------------------------------------- visible region, pictures


def visible_region(model: torch.nn.Module, size: int, in_chans: int, device, lung_focus: str = "off") -> dict:
    """Which pixels can change the logits at all: bool (H, W) ``support`` and its share ``fraction``.

    The gradient |d logits / d pixel| (random class weights, so classes cannot cancel) summed over
    `VISIBLE_PROBES` seeded random images is non-zero only where a pixel reaches the logits. A max pool
    passes gradient only through each window's maximum, so a few probes leave holes inside the region: its
    bounding rectangle is taken (a convolution's receptive field is one), then intersected with the pixels
    the lung-focus preprocessing passes on (`lungs.focus_values`: the template under "mask").
    """
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (VISIBLE_PROBES, 1, size, size), generator=g).float().to(device)
    pixels.requires_grad_(True)
    mean, std = normalize_stats(in_chans)
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        focused = focus_values(pixels, lung_focus)
        (passed,) = torch.autograd.grad(focused.sum(), pixels, retain_graph=True)
        # eval_transform's normalisation, on float pixels so that gradients flow back to them
        x = focused.expand(-1, in_chans, -1, -1) / 255
        x = (x - torch.tensor(mean, device=device).view(1, -1, 1, 1)) / torch.tensor(std, device=device).view(
            1, -1, 1, 1
        )
        logits = model(x).float()
        weights = torch.randn(logits.shape, generator=g).to(device)
        (grad,) = torch.autograd.grad((logits * weights).sum(), pixels)
    model.train(was_training)
    reached = (grad.abs().sum(dim=(0, 1)) > 0).cpu().numpy()
    support = np.zeros_like(reached)
    rows, cols = np.flatnonzero(reached.any(1)), np.flatnonzero(reached.any(0))
    if rows.size:
        support[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
    support &= (passed.abs().sum(dim=(0, 1)) > 0).cpu().numpy()
    fraction = float(support.mean())
    if fraction >= 0.999:
        note = "Every pixel of the image can influence the model's output."
    elif rows.size:
        note = (
            f"Only {fraction:.0%} of each image can influence the model's output (rows {rows[0]}-{rows[-1]}, "
            f"columns {cols[0]}-{cols[-1]} of {size} px at most); the rest, shaded in the picture, never "
            "reaches the logits, whatever it shows."
        )
    else:
        note = "No pixel changes the model's output: it returns the same logits for every image."
    return {"fraction": fraction, "note": note, "support": support}


def _png(img: Image.Image, path: Path) -> Path:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _panel(pixels: np.ndarray, caption: str, side: int) -> Image.Image:
    """A uint8 gray (H, W) or RGB (H, W, 3) image scaled to `side` px under a caption band."""
    img = Image.fromarray(pixels).resize((side, side), Image.Resampling.NEAREST).convert("RGB")
    panel = Image.new("RGB", (side, side + 14), (0, 0, 0))
    panel.paste(img, (0, 14))
    ImageDraw.Draw(panel).text((2, 1), caption, fill=(255, 255, 255))
    return panel


def first_sample(manifest: Manifest, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The split's first sample as uint8 (1, 1, H, W), and its mask (bool, same shape) or None."""
    for images, _labels, _keys, *masks in eval_batches(
        manifest, split, batch_size=1, rank=0, world_size=1, num_workers=0, masks=manifest.has_masks
    ):
        return images, masks[0] if masks else None
    raise InputError(f"{manifest.source}: split '{split}' has no samples to audit")


def draw_examples(images: torch.Tensor, masks: torch.Tensor | None, path: Path) -> Path:
    """One image under each variant, side by side, titled (audit_examples.png)."""
    side = max(192, images.shape[-1])
    versions = Occlusions(masks=masks is not None)(images, masks)
    row = Image.new("RGB", (side * len(VARIANTS), side + 14))
    for i, (v, (title, _)) in enumerate(zip(versions, VARIANTS.values(), strict=True)):
        row.paste(_panel(v[0, 0].numpy(), title, side), (i * side, 0))
    return _png(row, path)


def draw_visible(image: torch.Tensor, support: np.ndarray, fraction: float, path: Path) -> Path:
    """The image with every pixel the model cannot see tinted red (audit_visible.png)."""
    gray = image[0, 0].numpy().astype(np.float32)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    blind = ~support
    rgb[blind] = 0.45 * rgb[blind] + 0.55 * np.array([220.0, 40.0, 40.0])
    caption = f"red: never reaches the logits; {fraction:.0%} of the image is seen"
    return _png(_panel(rgb.clip(0, 255).astype(np.uint8), caption, max(256, gray.shape[0])), path)


def gradcam_share(summary_path: Path) -> dict | None:
    """Grad-CAM's mean inside-the-lungs share from explain's summary, weighted by images, or None."""
    try:
        shards = json.loads(Path(summary_path).read_text())["shards"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    rows = [r for r in shards.get("per_class", {}).values() if r.get("mean_inside_share") is not None]
    if not rows:
        return None
    total = sum(r["images"] for r in rows)
    mean = sum(r["mean_inside_share"] * r["images"] for r in rows) / total
    return {"inside_share_mean": mean, "region": shards.get("region", "box")}


# ------------------------------------------------------------------------------------------- writing


def picture_paths(out: Path) -> dict[str, Path]:
    """The pictures beside audit JSON `out`: the run-dir names, or named after another --out."""
    paths = {"examples": out.with_name(AUDIT_EXAMPLES_PNG), "visible": out.with_name(AUDIT_VISIBLE_PNG)}
    if out.name != AUDIT_FILE:  # so that two audits in one folder never share a picture
        paths = {kind: out.with_name(f"{out.stem}_{kind}.png") for kind in paths}
    return paths


@dataclass(frozen=True)
class AuditSetup:
    """How the audit ran: what `finish_audit` needs beside the scores, and audit.json records."""

    split: str
    options: AuditOptions
    in_chans: int  # the model's input channels (meta.json)
    device: torch.device
    lung_focus: str  # the model's preprocessing (meta.json preprocess.lung_focus)
    gradcam_summary: Path | None  # explain's summary of this model, when there is one
    provenance: dict  # model, shards: where the numbers come from


def finish_audit(
    variants: dict[str, SplitScores], model, manifest: Manifest, out: Path, setup: AuditSetup
) -> tuple[dict, list[Path]]:
    """audit.json at `out` (`audit_report`, plus visible region, per source, Grad-CAM, provenance) and its
    pictures beside it (`AUDIT_EXAMPLES_PNG`, `AUDIT_VISIBLE_PNG`; `<stem>_examples.png` and
    `<stem>_visible.png` for another name). Main process only. Returns the report and the files written."""
    source = "shards" if manifest.has_masks else "template"
    report = audit_report(variants, manifest.classes, setup.options, source, setup.lung_focus)
    images, masks = first_sample(manifest, setup.split)
    visible = visible_region(model, manifest.image_size, setup.in_chans, setup.device, setup.lung_focus)
    paths = picture_paths(out)
    written = [
        draw_examples(images, masks, paths["examples"]),
        draw_visible(images, visible["support"], visible["fraction"], paths["visible"]),
    ]
    summary = setup.gradcam_summary
    report |= {
        "split": setup.split,
        "visible_region": {"fraction": visible["fraction"], "note": visible["note"]}
        | {"image": paths["visible"].name},
        "examples_image": paths["examples"].name,
        "gradcam": gradcam_share(summary) if summary is not None else None,
        "per_source": per_source(variants["intact"], manifest, setup.split, manifest.classes, setup.options),
        "provenance": {**setup.provenance, "lung_focus": setup.lung_focus, **provenance()},
    }
    atomic_write_json(out, report)
    return report, [out, *written]


def print_audit(report: dict, console) -> None:
    """The variants as a small table (balanced accuracy and accuracy with intervals, recall per class,
    macro AUC), then the verdict's line."""
    from rich.table import Table

    def cell(value, interval=None) -> str:
        if value is None:
            return "-"
        return f"{value:.2f}" + (f" [{interval[0]:.2f}-{interval[1]:.2f}]" if interval else "")

    scored = report["classes_scored"]
    chance = report["chance"]["balanced_accuracy"]
    table = Table(
        title=f"Does the model read the lungs? {report['split']} split, n={report['num_samples']}, chance "
        f"{chance:.2f} (balanced accuracy), lung fields from the {report['mask_source']}",
        title_justify="left",
    )
    table.add_column("test images")
    for col in ("balanced acc.", "accuracy", *(f"recall {c[:10]}" for c in scored), "macro AUC"):
        table.add_column(col, justify="right")
    for v in report["variants"].values():
        m, iv = v["metrics"], v["metrics"].get("intervals") or {}
        table.add_row(
            v["title"],
            cell(m["balanced_accuracy"], iv.get("balanced_accuracy")),
            cell(m["accuracy"], iv.get("accuracy")),
            *(cell(m["per_class"][c]["recall"]) for c in scored),
            cell(m["macro"]["roc_auc"]),
        )
    console.print(table)
    console.print(report["verdict"]["line"], highlight=False)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cxrdist.audit",
        description="Does the model read the lungs? Scores a split as it is, with the lungs hidden, with "
        "only the lungs and with only the border visible, with 95%% intervals and a verdict.",
    )
    add_model(p)
    p.add_argument("--shards", required=True, help="directory or http(s) URL holding manifest.json")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", type=Path, help=f"audit JSON to write (default: RUN/{AUDIT_FILE})")
    p.add_argument("--force", action="store_true", help="replace --out (and its pictures) if it exists")
    p.add_argument(
        "--bootstrap",
        type=non_negative_int,
        help="resamples for the 95%% intervals (default: as the run's test_metrics.json, else 1000)",
    )
    p.add_argument(
        "--seed", type=non_negative_int, help="bootstrap seed (default: as test_metrics.json, else 0)"
    )
    add_batching(p, batch_size=128, workers=2)
    return p.parse_args(argv)


def _run_dir_of(model_dir: Path) -> Path:
    """The run directory around a model's best/ (or the model folder itself)."""
    return model_dir.parent if model_dir.name == "best" else model_dir


def bootstrap_defaults(run_dir: Path) -> tuple[int, int]:
    """(resamples, seed) of the run's test_metrics.json intervals, so the audit's match; else (1000, 0)."""
    try:
        settings = json.loads((run_dir / TEST_METRICS_FILE).read_text())["intervals"]["settings"]
        return int(settings["resamples"]), int(settings["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1000, 0


def main(argv: list[str] | None = None) -> int:
    from accelerate import PartialState

    args = parse_args(argv)
    model_dir = find_model_dir(args.model)
    run_dir = _run_dir_of(model_dir)
    out = args.out or run_dir / AUDIT_FILE
    refuse_existing([out, *picture_paths(out).values()], args.force)
    check_writable_file(out)  # before the evaluation, so a long one is never thrown away
    manifest = read_manifest(args.shards)
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU-only hosts: gloo ranks
    model, meta = load_trained_model(model_dir, state.device)
    check_compatible(meta, manifest)
    resamples, seed = bootstrap_defaults(run_dir)
    options = AuditOptions(
        meta.temperature,
        resamples if args.bootstrap is None else args.bootstrap,
        seed if args.seed is None else args.seed,
    )
    lung_focus = meta.lung_focus
    # The precision training tested the model in (meta.json), so the intact numbers are test_metrics.json's.
    precision, _why = eval_precision("auto", meta, torch.cuda.is_available())
    settings = model_scoring(
        meta, state.device, precision, batch_size=args.batch_size, num_workers=args.num_workers
    )
    scores = score_variants(
        model, manifest, args.split, settings, rank=state.process_index, world_size=state.num_processes
    )
    if state.is_main_process:
        summary = run_dir / GRADCAM_DIR / EXPLAIN_SUMMARY
        setup = AuditSetup(
            split=args.split,
            options=options,
            in_chans=meta.in_chans,
            device=state.device,
            lung_focus=lung_focus,
            gradcam_summary=summary if summary.exists() else None,
            provenance={"model": str(model_dir), "shards": manifest.source, "mixed_precision": precision},
        )
        report, written = finish_audit(scores, model, manifest, out, setup)
        console = stdout_console()
        if not console.is_terminal:
            console.width = 132  # a log's default 80 columns would wrap every cell of the table
        for path in written:
            console.print(f"  {path}", highlight=False)
        print_audit(report, console)
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
