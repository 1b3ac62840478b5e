"""What the report shows, gathered from a `RunRecord` into plain dicts of values and plain text: one
`gather_*` function per section, and `gather` for the whole page (templates/report.html.j2 renders it).
"""

from __future__ import annotations

import json
import shlex
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrdist.report.record import (
    RunRecord,
    class_order,
    figure,
    fmt,
    fmt_interval,
    get,
    headline,
    is_number,
    level,
    result_plot,
    uses_tta,
)
from cxrdist.rundir import (
    AUDIT_EXAMPLES_PNG,
    AUDIT_FILE,
    AUDIT_VISIBLE_PNG,
    BEST_DIR,
    CONFIG_FILE,
    CONFUSION_PNG,
    CURVES_PNG,
    EXPLAIN_SUMMARY,
    GRADCAM_DIR,
    METRICS_FILE,
    RELIABILITY_PNG,
    ROC_PNG,
    TEST_METRICS_FILE,
)
from cxrdist.stats import registry
from shard_tools.schema import SPLITS

# (key, label) pairs, from the one registry of metric names (cxrdist.stats.registry).
CLASS_METRICS = tuple((m.key, m.label) for m in registry.CLASS_METRICS)
HEADLINE = tuple((m.key, m.label) for m in (*registry.SUMMARY_METRICS, *registry.DERIVED_METRICS))
# The demo's folder of `shard_tools.synth` output (cxrdist.demo packs OUT/synthetic).
SYNTHETIC_FOLDER = "synthetic"
# cxrdist.audit's variants in its order (audit.json is written with sorted keys); others follow, as given.
AUDIT_ORDER = ("intact", "lungs_hidden", "lungs_only", "border_only")
LUNGS_OUT_OF_SIGHT = ("lungs_hidden", "border_only")  # above chance here: the model needs no lungs
DATABASE_MARK = "covid-19_radiography"  # the Kaggle zip's and folder's name, any case

# ------------------------------------------------------------------------------------------- the data


def describe_data(manifest: dict[str, Any] | None) -> dict[str, str]:
    """What the images are: ``kind`` (synthetic | database | folder | unknown), a ``short`` name for the
    title and a ``source`` path. Synthetic: the manifest says so (``"synthetic"``), or the source is the
    demo's folder of `shard_tools.synth` output; database: the source is the COVID-19 Radiography
    Database's folder or zip."""
    if manifest is None:
        return {"kind": "unknown", "short": "unrecorded data", "source": ""}
    source = str(manifest.get("source") or "")
    name = Path(source.rstrip("/")).name
    if manifest.get("synthetic") or name == SYNTHETIC_FOLDER:
        return {"kind": "synthetic", "short": "synthetic radiographs", "source": source}
    if DATABASE_MARK in source.lower():
        return {"kind": "database", "short": "the COVID-19 Radiography Database", "source": source}
    return {
        "kind": "folder",
        "short": f"images from {name or source or 'an unrecorded folder'}",
        "source": source,
    }


def _command_groups(command: Sequence[str]) -> list[str]:
    """The pack command as shell words, an option kept with its value so a line never breaks inside one."""
    words = [shlex.quote(str(a)) for a in command]
    groups: list[str] = []
    for i, word in enumerate(words):
        takes_value = i > 0 and words[i - 1].startswith("-") and not word.startswith("-")
        if takes_value and groups and groups[-1] == words[i - 1]:
            groups[-1] += " " + word
        else:
            groups.append(word)
    return groups


def gather_data(run: RunRecord) -> dict[str, Any] | None:
    manifest = run.manifest
    if manifest is None:
        return None
    splits = manifest.get("splits") if isinstance(manifest.get("splits"), dict) else {}
    present = [s for s in SPLITS if isinstance(splits.get(s), dict)]
    rows = []
    for name in run.classes:
        counts = [get(splits, s, "class_counts", name) for s in present]
        rows.append({"name": name, "counts": counts, "total": sum(c for c in counts if isinstance(c, int))})
    totals = [get(splits, s, "count") for s in present]
    groups = [get(splits, s, "groups") for s in present]
    group_sizes = [len(g) if isinstance(g, list) else None for g in groups]
    command = manifest.get("command")
    fractions = manifest.get("split_fractions")
    duplicates = manifest.get("duplicates")
    skipped = manifest.get("skipped")
    group_info = manifest.get("groups")
    return {
        "splits": present,
        "rows": rows,
        "totals": totals,
        "grand_total": sum(c for c in totals if isinstance(c, int)),
        "group_sizes": group_sizes if any(n is not None for n in group_sizes) else None,
        "source": manifest.get("source"),
        "command": _command_groups(command) if isinstance(command, list) and command else None,
        "image_size": manifest.get("image_size"),
        "split_shares": (
            ", ".join(f"{s} {fractions[s]:.0%}" for s in SPLITS if is_number(fractions.get(s)))
            if isinstance(fractions, dict)
            else None
        ),
        "seed": manifest.get("seed", "?"),
        "duplicate_sets": len(duplicates) if isinstance(duplicates, list) else None,
        "duplicates_dropped": sum(
            len(d.get("dropped") or []) for d in duplicates or [] if isinstance(d, dict)
        ),
        "skipped": len(skipped) if isinstance(skipped, list) else None,
        "grouping": (
            {"file": group_info.get("file") or "?", "own_groups": group_info.get("own_groups")}
            if isinstance(group_info, dict)
            else None
        ),
        "tool_version": manifest.get("tool_version"),
    }


# ----------------------------------------------------------------------------------- the other parts


def gather_summary(run: RunRecord) -> dict[str, Any]:
    m = run.metrics
    rows = [{"key": k, "label": label, **_value(*headline(m, k))} for k, label in HEADLINE]
    return {
        "rows": rows,
        "level": level(run),
        "num_samples": m.get("num_samples"),
        "best_epoch": m.get("best_epoch"),
        "epochs": len(run.rows),
        "model": get(run.config, "model", "name"),
        "probabilities": get(m, "probabilities", "source"),
        "tta": uses_tta(m),
        "precision": _precision(run),
        "settings": (
            {k: settings.get(k) for k in ("level", "method", "resamples", "seed")}
            if isinstance(settings := get(run.intervals, "settings"), dict)
            else None
        ),
        "metrics_file": run.shown(run.metrics_file),
        "from_evaluate": run.metrics_file != run.run_dir / TEST_METRICS_FILE,
        "other_evaluations": _other_evaluations(run),
    }


def _precision(run: RunRecord) -> str | None:
    """The precision the test numbers were computed in: evaluate records it in its JSON ("precision"),
    training in config.toml's header. A number travels with the precision it was computed in."""
    used = get(run.metrics, "precision", "mixed_precision") or run.header.get("mixed_precision used")
    names = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}
    return names.get(used, used) if isinstance(used, str) else None


def _value(value: Any, interval: Any = None) -> dict[str, Any]:
    return {"value": value, "interval": interval}


def _other_evaluations(run: RunRecord) -> list[dict[str, Any]]:
    """cxrdist.evaluate's results in best/ that this page does not show (``--metrics`` shows them)."""
    found = []
    for path in sorted((run.run_dir / BEST_DIR).glob("eval_*.json")):
        if path == run.metrics_file:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("per_class"), dict):
            found.append({"file": run.shown(path), "tta": uses_tta(data), "split": data.get("split", "?")})
    return found


def gather_training(run: RunRecord) -> dict[str, Any] | None:
    if not run.rows and not (run.run_dir / CURVES_PNG).exists():
        return None
    alt = "training curves: loss, validation accuracy, balanced accuracy and macro F1 per epoch"
    out: dict[str, Any] = {"figure": figure(run, CURVES_PNG, alt), "epochs": [], "problem": None}
    if not run.rows:
        out["problem"] = run.problems.get(METRICS_FILE)
        return out
    best = next((r for r in run.rows if r.get("epoch") == run.metrics.get("best_epoch")), None)
    last = run.rows[-1]
    picked = [("best epoch", best)] if best is not None and best is not last else []
    picked.append(("last epoch, best" if best is last else "last epoch", last))
    for label, r in picked:
        val = r.get("val") if isinstance(r.get("val"), dict) else {}
        values = [r.get("train_loss"), *(val.get(k) for k in ("loss", "accuracy", "balanced_accuracy"))]
        out["epochs"].append(
            {"label": label, "epoch": r.get("epoch", "?"), "cells": values, "lr": r.get("lr")}
        )
    speeds = [r["images_per_s"] for r in run.rows if is_number(r.get("images_per_s"))]
    metric = get(run.config, "train", "best_metric")
    out |= {
        "count": len(run.rows),
        "minutes": sum(r["epoch_seconds"] for r in run.rows if is_number(r.get("epoch_seconds"))) / 60,
        "median_speed": statistics.median(speeds) if speeds else None,
        "best_metric": dict(HEADLINE).get(metric, metric) if metric else None,
    }
    return out


def gather_results(run: RunRecord) -> dict[str, Any]:
    m, ci = run.metrics, run.intervals
    rows = []
    for name in run.classes:
        row = get(m, "per_class", name) or {}
        cells = [_value(row.get(k), get(ci, "per_class", name, k)) for k, _ in CLASS_METRICS]
        rows.append({"name": name, "cells": cells, "support": row.get("support")})
    averages = [
        {"name": avg, "cells": [_value(get(m, avg, k), get(ci, avg, k)) for k, _ in CLASS_METRICS]}
        for avg in ("macro", "weighted")
    ]
    covered = m.get("macro_over")  # the classes with test images, which the macro average covers
    plot = result_plot(run, "confusion", CONFUSION_PNG)
    caption = "Rows: true class; columns: predicted class."
    return {
        "labels": [label for _, label in CLASS_METRICS],
        "rows": rows,
        "averages": averages,
        "num_samples": m.get("num_samples"),
        "left_out": [c for c in run.classes if c not in covered] if isinstance(covered, list) else [],
        "figure": figure(run, plot, "confusion matrix of the test split", caption),
    }


def gather_roc(run: RunRecord) -> dict[str, Any] | None:
    points = run.metrics.get("operating_points")
    plot = result_plot(run, "roc", ROC_PNG)
    if not isinstance(points, dict) and not plot.exists():
        return None
    classes = []
    for name in class_order(run, points if isinstance(points, dict) else {}):
        entry = points[name]
        if not isinstance(entry, dict) or not entry.get("points"):
            classes.append({"name": name, "points": None})
            continue
        rows = [
            {
                "target": str(p.get("target", "?")),
                "threshold": p.get("threshold"),
                "sensitivity": _value(p.get("sensitivity"), p.get("sensitivity_interval")),
                "specificity": _value(p.get("specificity"), p.get("specificity_interval")),
            }
            for p in entry["points"]
        ]
        classes.append(
            {"name": name, "points": rows} | {k: entry.get(k) for k in ("auc", "positives", "negatives")}
        )
    return {
        "figure": figure(run, plot, "one-vs-rest ROC curves with the operating points marked"),
        "classes": classes if isinstance(points, dict) else None,
        "null_threshold": any(not is_number(p["threshold"]) for c in classes for p in c["points"] or []),
    }


def gather_calibration(run: RunRecord) -> dict[str, Any] | None:
    cal = run.metrics.get("calibration")
    plot = result_plot(run, "reliability", RELIABILITY_PNG)
    if not isinstance(cal, dict) and not plot.exists():
        return None
    out: dict[str, Any] = {
        "figure": figure(run, plot, "reliability diagram: accuracy against confidence per bin"),
        "rows": None,
    }
    if not isinstance(cal, dict):
        return out
    before, after = cal.get("before") or {}, cal.get("after")
    temperature = cal.get("temperature")
    fitted_on = cal.get("temperature_fitted_on")
    meta = get(run.model_meta, "calibration") or {}
    if not fitted_on and meta.get("temperature") == temperature:  # train keeps it with the model
        fitted_on = meta.get("fitted_on")
    measures = (("ece", "ECE"), ("brier", "Brier score"), ("nll", "NLL (nats)"))
    return out | {
        "rows": [
            {"key": k, "label": label, "before": _value(before.get(k)), "after": _value(get(after, k))}
            for k, label in measures
        ],
        "has_after": isinstance(after, dict),
        "temperature": temperature if isinstance(after, dict) and is_number(temperature) else None,
        "fitted_on": fitted_on,
        "n_bins": cal.get("n_bins", 15),
    }


def gather_tta(run: RunRecord) -> dict[str, Any] | None:
    m = run.metrics
    without = m.get("without_tta")
    if not isinstance(without, dict):
        return {"rows": None} if uses_tta(m) else None
    rows = []
    for key, label in (*HEADLINE, ("loss", "loss (NLL)")):
        if key in without:
            (a, ci_a), (b, ci_b) = headline(m, key), headline(without, key)
            change = f"{a - b:+.4f}" if is_number(a) and is_number(b) else "–"
            rows.append({"key": key, "label": label, "with": _value(a, ci_a), "without": _value(b, ci_b),
                         "change": change})  # fmt: skip
    return {"rows": rows}


def _metric_rows(groups: dict[str, Any], first: str = "num_samples") -> tuple[list, list]:
    """(columns, rows) of headline metrics for named parts of the test split (subgroups, sources)."""
    parts = [g for g in groups.values() if isinstance(g, dict)]
    keys = [(k, label) for k, label in HEADLINE if any(headline(g, k)[0] is not None for g in parts)]
    rows = [
        {"name": name, "n": get(g, first), "cells": [_value(*headline(g, k)) for k, _ in keys]}
        for name, g in groups.items()
    ]
    return [label for _, label in keys], rows


def gather_subgroups(run: RunRecord) -> dict[str, Any] | None:
    groups = run.metrics.get("subgroups")
    if not isinstance(groups, dict) or not groups:
        return None
    columns, rows = _metric_rows(groups)
    return {"columns": columns, "rows": rows}


def gather_gradcam(run: RunRecord) -> dict[str, Any] | None:
    explain = run.explain
    split = explain.get("split", "test") if explain else "test"
    grid = f"{GRADCAM_DIR}/gradcam_grid_{split}.png"
    if explain is None and not (run.run_dir / grid).exists():
        return None
    caption = (
        "One row per true class; under each image its true class and the class the model predicted (red "
        "when wrong). White box: the central lung box."
    )
    per_class = explain.get("per_class") if explain else None
    rows = None
    if isinstance(per_class, dict):
        rows = []
        for name in class_order(run, per_class):
            r = per_class[name] if isinstance(per_class[name], dict) else {}
            keys = ("images", "mean_inside_share", "mean_outside_share", "accuracy")
            rows.append({"name": name, **{k: r.get(k) for k in keys}})
    box = explain.get("lung_box") if explain else None
    return {
        "figure": figure(run, grid, f"Grad-CAM heat maps of {split} images, one row per true class", caption),
        "rows": rows,
        "summary_file": f"{GRADCAM_DIR}/{EXPLAIN_SUMMARY}",
        "inside": any(r["mean_inside_share"] is not None for r in rows or []),
        "region": {"mask": "the lung masks in the shards", "template": "cxrdist's lung template"}.get(
            explain.get("region") if explain else None, "the lungs"
        ),
        "box": box if isinstance(box, list) and len(box) == 4 and all(map(is_number, box)) else None,
    }


def gather_audit(run: RunRecord) -> dict[str, Any]:
    """The occlusion audit (audit.json, contract in /work/notes → cxrdist.audit): variants with their
    intervals, where occluded images go, the verdict; or how to run it."""
    audit = run.audit
    command = f"python -m cxrdist.audit {run.run_dir} --shards SHARDS"
    if audit is None:
        return {
            "ran": False,
            "command": command,
            "run_dir": str(run.run_dir),
            "problem": run.problems.get(AUDIT_FILE),
        }
    classes = [c for c in audit.get("classes") or run.classes]
    scored = [c for c in audit.get("classes_scored") or classes]
    variants = []
    given = audit.get("variants") if isinstance(audit.get("variants"), dict) else {}
    for key in [*(k for k in AUDIT_ORDER if k in given), *(k for k in given if k not in AUDIT_ORDER)]:
        v = given[key]
        m = v.get("metrics") if isinstance(v, dict) else None
        m = m if isinstance(m, dict) else {}
        ci = m.get("intervals") if isinstance(m.get("intervals"), dict) else {}
        cm = m.get("confusion_matrix")
        variants.append(
            {
                "key": key,
                "title": v.get("title", key) if isinstance(v, dict) else key,
                "description": v.get("description", "") if isinstance(v, dict) else "",
                "cells": [
                    _value(*headline(m, k)) for k in ("accuracy", "balanced_accuracy", "macro_roc_auc")
                ],
                "recalls": [
                    _value(get(m, "per_class", c, "recall"), get(ci, "per_class", c, "recall"))
                    for c in scored
                ],  # fmt: skip
                "confusion": _confusion(cm, classes),
            }
        )
    chance = {k: get(audit, "chance", k) for k in ("accuracy", "balanced_accuracy")}
    margin = audit.get("margin") if is_number(audit.get("margin")) else 0.0
    for v in variants:  # shade balanced accuracy that stays above chance without the lungs
        low = (v["cells"][1]["interval"] or [None])[0]
        bar = chance["balanced_accuracy"]
        v["flag"] = (
            v["key"] in LUNGS_OUT_OF_SIGHT and is_number(low) and is_number(bar) and low > bar + margin
        )
    gradcam = audit.get("gradcam") if isinstance(audit.get("gradcam"), dict) else None
    if gradcam is not None:
        gradcam = {"inside_share_mean": gradcam.get("inside_share_mean"), "region": gradcam.get("region")}
    per_source = audit.get("per_source")
    sources = _metric_rows(per_source) if isinstance(per_source, dict) and per_source else None
    verdict = audit.get("verdict") or {}
    visible = audit.get("visible_region") if isinstance(audit.get("visible_region"), dict) else {}
    return {
        "ran": True,
        "command": command,
        "split": audit.get("split", "test"),
        "num_samples": audit.get("num_samples"),
        "classes": classes,
        "scored": scored,
        "variants": variants,
        "chance": chance,
        "margin": margin,
        "intervals": {k: get(audit, "intervals", k) for k in ("method", "resamples", "seed", "level")},
        "mask_note": audit.get("mask_note") or "",
        "mask_source": audit.get("mask_source"),
        "flagged": bool(verdict.get("shortcut_suspected")),
        "verdict": verdict.get("line") or "The audit wrote no verdict.",
        "reasons": [r for r in verdict.get("reasons") or [] if isinstance(r, str)],
        "visible_fraction": visible.get("fraction"),
        "visible_note": visible.get("note") or "",
        "visible": figure(
            run,
            str(visible.get("image") or AUDIT_VISIBLE_PNG),
            "the part of the image the model sees",
            "A test image; tinted red: the pixels the model's output never depends on.",
        ),
        "examples": figure(
            run,
            str(audit.get("examples_image") or AUDIT_EXAMPLES_PNG),
            "one test image as each variant shows it to the model",
            "One test image as each variant shows it to the model.",
        ),
        "gradcam": gradcam,
        "sources": {"columns": sources[0], "rows": sources[1]} if sources else None,
    }


def _confusion(cm: Any, classes: list[str]) -> dict[str, Any] | None:
    """Counts and row shares (rows: true class) of a confusion matrix, None when it is not k x k."""
    k = len(classes)
    if not (isinstance(cm, list) and len(cm) == k and all(isinstance(r, list) and len(r) == k for r in cm)):
        return None
    rows = []
    for name, r in zip(classes, cm, strict=True):
        total = sum(n for n in r if is_number(n))
        rows.append({"name": name, "cells": [(n, n / total if total and is_number(n) else 0.0) for n in r]})
    return {"rows": rows}


def gather_card(run: RunRecord, data: dict[str, str], audit: dict[str, Any], has_gradcam: bool) -> dict:
    """The model card's facts; its prose is templates/model_card.html.j2."""
    m, ci, manifest = run.metrics, run.intervals, run.manifest or {}
    counts = []
    for name in run.classes:
        n = sum(c for s in SPLITS if isinstance(c := get(manifest, "splits", s, "class_counts", name), int))
        counts.append(f"{name} {n:,}")
    headline = []
    for key, label in HEADLINE[:3]:
        interval = fmt_interval(ci.get(key))
        headline.append(f"{label} {fmt(m.get(key))}" + (f" {interval}" if interval else ""))
    recalls = []
    for name in run.classes:
        interval = fmt_interval(get(ci, "per_class", name, "recall"))
        recalls.append(
            f"{name} {fmt(get(m, 'per_class', name, 'recall'))}" + (f" {interval}" if interval else "")
        )
    return {
        "training": _training_facts(run),
        "data": data,
        "has_manifest": run.manifest is not None,
        "counts": ", ".join(counts),
        "audit": audit,
        "has_gradcam": has_gradcam,
        "num_samples": m.get("num_samples"),
        "headline": ", ".join(headline),
        "recalls": "; ".join(recalls),
        "has_intervals": isinstance(ci.get("settings"), dict),
        "level": level(run),
    }


def _training_facts(run: RunRecord) -> list[str]:
    """How the model was trained, as short plain phrases (config.toml and its provenance header)."""
    cfg, facts = run.config, []
    model, pretrained = get(cfg, "model", "name"), get(cfg, "model", "pretrained")
    if model:
        weights = "" if pretrained is None else " from ImageNet weights" if pretrained else " from scratch"
        facts.append(f"{model} trained{weights}" if weights else str(model))
    epochs = get(cfg, "train", "epochs")
    if run.rows or epochs:
        ran = f"{len(run.rows)} of {epochs}" if run.rows and epochs else f"{epochs or len(run.rows)}"
        facts.append(f"{ran} epochs, best epoch {run.metrics.get('best_epoch', '?')}")
    optim = get(cfg, "optim")
    if isinstance(optim, dict) and optim.get("name"):
        lr, schedule = optim.get("lr", "?"), optim.get("schedule", "?")
        facts.append(f"{optim['name']}, learning rate {lr}, {schedule} schedule")
    if batch := get(cfg, "train", "per_device_batch_size"):
        facts.append(f"{batch} images per device per step")
    if world := run.header.get("world_size"):
        facts.append(f"{world} process(es)")
    if precision := run.header.get("mixed_precision used"):
        facts.append(f"mixed precision {precision}")
    version, commit = run.provenance("cxrdist_version"), run.provenance("git_commit")
    if version or commit:
        facts.append(f"cxrdist {version or '?'}, commit {commit or '?'}")
    return facts


@dataclass(frozen=True)
class Section:
    ident: str
    title: str
    data: dict[str, Any] | None  # None: the run has nothing for it
    core: bool  # a run normally has it: named under the contents when it is missing


def gather(run: RunRecord) -> dict[str, Any]:
    """Everything the page shows, as plain values for templates/report.html.j2."""
    data = describe_data(run.manifest)
    audit = gather_audit(run)
    gradcam = gather_gradcam(run)
    sections = [
        Section("summary", "Summary", gather_summary(run), True),
        Section("audit", "Does the model read the lungs?", audit, True),
        Section("data", "Data", gather_data(run), True),
        Section("training", "Training", gather_training(run), True),
        Section("results", "Test results per class", gather_results(run), True),
        Section("roc", "ROC curves and operating points", gather_roc(run), True),
        Section("calibration", "Calibration", gather_calibration(run), True),
        Section("tta", "Test-time augmentation", gather_tta(run), False),
        Section("subgroups", "Subgroups", gather_subgroups(run), False),
        Section("gradcam", "Grad-CAM: where the model looks", gradcam, True),
        Section("model-card", "Model card", gather_card(run, data, audit, gradcam is not None), True),
        Section(
            "recipe",
            "Recipe",
            {"text": run.config_text, "problem": run.problems.get(CONFIG_FILE)}
            if run.config_text is not None
            else None,
            True,
        ),  # fmt: skip
    ]
    model = get(run.config, "model", "name")
    return {
        "title": f"{model or 'a model'} trained on {data['short']}",
        "data": data,
        "model": model,
        "manifest": run.manifest,
        "classes": run.classes,
        "num_samples": run.metrics.get("num_samples"),
        "run_dir": str(run.run_dir),
        "version": run.provenance("cxrdist_version"),
        "commit": run.provenance("git_commit"),
        "audit": audit,
        "sections": [s for s in sections if s.data is not None],
        "missing": [s.title for s in sections if s.data is None and s.core],
        "gradcam_missing": gradcam is None,
        "problems": sorted(run.problems.items()),
    }
