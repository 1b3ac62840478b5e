"""The run report: ``run.dir/report.html``, one page that shows a finished run to a person.

    python -m cxrdist.report RUN_DIR [--metrics FILE]   # (re)writes RUN_DIR/report.html, prints its path

Reads what the run wrote; only the test metrics are required:

- ``test_metrics.json`` (`cxrdist.evaluate.full_metrics`, written by training), or with ``--metrics FILE``
  the JSON that ``python -m cxrdist.evaluate`` wrote (``best/eval_test.json`` by default; with ``--tta``
  it holds both views), with its plots beside it (``<stem>_confusion.png``, ``_roc``, ``_reliability``).
  Keys: `cxrdist.metrics.summarize`'s, ``best_epoch``, ``provenance``, and optionally ``intervals``,
  ``calibration``, ``operating_points``, ``probabilities``, ``without_tta``, ``subgroups``.
- ``config.toml``: the resolved recipe; its ``# key: value`` header lines carry the provenance.
- ``manifest.json``: classes, per-split counts, ``source``, ``command``, groups (`shard_tools.schema`).
- ``metrics.jsonl``: one row per epoch; ``best/meta.json``: where the temperature was fitted.
- ``audit.json`` (`cxrdist.audit`; contract in the module's docstring) with ``audit_visible.png`` and
  ``audit_examples.png``: the "Does the model read the lungs?" section and the model card's measured risks.
- the plots (`cxrdist.plots`) and ``gradcam/explain_summary.json`` with its grid (`cxrdist.explain`).

This module only gathers: every function below turns files into plain dicts of values and plain text.
The page's markup, its stylesheet and the model card's prose are Jinja2 templates in
``cxrdist/templates/`` (package data), rendered with autoescape on, so every string taken from a file
is escaped by default. The page is self-contained: images are base64 ``data:`` URIs, the stylesheet is
inline, there is no script and nothing is fetched. A section whose inputs are all absent is left out (the
core ones are named in one muted line under the contents); a missing or damaged image is one muted line.
Values print with 4 decimals and intervals with 2, as the terminal table (`cxrdist.tables`) does.

Only the standard library, jinja2 and shard_tools are imported (no torch, numpy or matplotlib).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from cxrdist.rundir import (
    BEST_DIR,
    BEST_META,
    CONFIG_FILE,
    CONFUSION_PNG,
    CURVES_PNG,
    EXPLAIN_SUMMARY,
    GRADCAM_DIR,
    MANIFEST_FILE,
    METRICS_FILE,
    RELIABILITY_PNG,
    REPORT_FILE,
    ROC_PNG,
    TEST_METRICS_FILE,
)
from shard_tools.cli import run_main
from shard_tools.errors import EXIT_OK, CxrdistError, InputError
from shard_tools.files import atomic_write_text
from shard_tools.schema import SPLITS

try:
    from cxrdist.rundir import AUDIT_FILE
except ImportError:  # until cxrdist.audit's constant lands in rundir (contracts: the same name)
    AUDIT_FILE = "audit.json"

CLASS_METRICS = (
    ("precision", "precision"),
    ("recall", "recall (sensitivity)"),
    ("specificity", "specificity"),
    ("f1", "F1"),
    ("roc_auc", "ROC-AUC"),
)
HEADLINE = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("macro_f1", "macro F1"),
    ("weighted_f1", "weighted F1"),
    ("macro_roc_auc", "macro ROC-AUC"),
)
NOT_WRITTEN = "not written by this run"
# The demo's folder of `shard_tools.synth` output (cxrdist.demo packs OUT/synthetic).
SYNTHETIC_FOLDER = "synthetic"
DATABASE_MARK = "covid-19_radiography"  # the Kaggle zip's and folder's name, any case

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk and its CRC: a PNG cut short does not end with it


class ReportError(InputError):
    """RUN_DIR is not a finished run's folder; the message names what is missing. Exit 2."""


@dataclass(frozen=True)
class RunRecord:
    """What a run directory holds, read once. Absent optional files are None (or empty)."""

    run_dir: Path
    metrics: dict[str, Any]  # test_metrics.json, or the --metrics file
    metrics_file: Path  # where `metrics` came from
    manifest: dict[str, Any] | None
    config_text: str | None  # config.toml as written
    config: dict[str, Any]  # config.toml parsed ({} when absent or unparsable)
    header: dict[str, str]  # its "# key: value" lines
    rows: list[dict[str, Any]]  # metrics.jsonl
    explain: dict[str, Any] | None  # explain_summary.json's "shards" entry
    model_meta: dict[str, Any] | None  # best/meta.json (where the fitted temperature is recorded)
    audit: dict[str, Any] | None  # audit.json
    problems: dict[str, str]  # file name -> why it could not be read

    @property
    def classes(self) -> list[str]:
        """Manifest order; a metrics file alone has its keys sorted (atomic_write_json)."""
        per_class = list((self.metrics.get("per_class") or {}).keys())
        listed = list((self.manifest or {}).get("classes") or [])
        return listed + [c for c in per_class if c not in listed]

    @property
    def intervals(self) -> dict[str, Any]:
        return self.metrics.get("intervals") or {}

    def provenance(self, key: str) -> str | None:
        return self.header.get(key) or (self.metrics.get("provenance") or {}).get(key)

    def shown(self, path: Path) -> str:
        """A file's name as the page shows it: relative to the run directory when inside it."""
        return str(path.relative_to(self.run_dir)) if path.is_relative_to(self.run_dir) else str(path)


# --------------------------------------------------------------------------------------------- reading


def _read_json(run_dir: Path, relative: str, problems: dict[str, str]) -> Any:
    """An optional JSON object: None when absent; when unreadable, None and a note in `problems`."""
    path = run_dir / relative
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        problems[relative] = f"could not be read ({e})"
        return None
    if not isinstance(data, dict):
        problems[relative] = "is not a JSON object"
        return None
    return data


def _config_header(text: str) -> dict[str, str]:
    """The comment lines train writes above the recipe: ``# cxrdist_version: 0.1.0`` and so on."""
    header = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line[1:].partition(":")
        if sep:
            header[key.strip()] = value.strip()
    return header


def _read_metrics(path: Path) -> dict[str, Any]:
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("per_class"), dict):
        raise ReportError(f"{path}: not a metrics file written by cxrdist (no per_class table)")
    return metrics


def read_run(run_dir: Path, metrics_file: Path | None = None) -> RunRecord:
    """Read a run directory. Raises `ReportError` when it is not one, or its test metrics (test_metrics.json,
    or `metrics_file`) are missing or unreadable; any other file that is missing or unreadable only leaves
    its part of the page out."""
    run_dir = Path(run_dir).absolute()
    if not run_dir.exists():
        raise ReportError(f"{run_dir}: no such folder; give a run directory (the recipe's run.dir)")
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is a file; give a run directory (the recipe's run.dir)")
    if metrics_file is not None:
        metrics_path = Path(metrics_file).absolute()
        if not metrics_path.is_file():
            raise ReportError(f"{metrics_file}: no such file (give the JSON that cxrdist.evaluate wrote)")
    else:
        metrics_path = run_dir / TEST_METRICS_FILE
        if not metrics_path.is_file():
            if not any((run_dir / name).exists() for name in (CONFIG_FILE, MANIFEST_FILE, METRICS_FILE)):
                raise ReportError(
                    f"{run_dir} is not a run directory: no {TEST_METRICS_FILE}, {CONFIG_FILE} or "
                    f"{MANIFEST_FILE} in it"
                )
            raise ReportError(
                f"{run_dir}: no {TEST_METRICS_FILE}: has the run finished? (train writes it after the last "
                "epoch)"
            )
    metrics = _read_metrics(metrics_path)

    problems: dict[str, str] = {}
    config_text, config, header = None, {}, {}
    if (run_dir / CONFIG_FILE).is_file():
        try:
            config_text = (run_dir / CONFIG_FILE).read_text(encoding="utf-8")
            header = _config_header(config_text)
            config = tomllib.loads(config_text)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            problems[CONFIG_FILE] = f"could not be parsed ({e})"
    rows = []
    if (run_dir / METRICS_FILE).is_file():
        try:
            lines = (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines()
            rows = [json.loads(line) for line in lines if line.strip()]
        except (OSError, ValueError) as e:
            problems[METRICS_FILE] = f"could not be read ({e})"
    summary = _read_json(run_dir, f"{GRADCAM_DIR}/{EXPLAIN_SUMMARY}", problems)
    explain = (summary or {}).get("shards")
    return RunRecord(
        run_dir=run_dir,
        metrics=metrics,
        metrics_file=metrics_path,
        manifest=_read_json(run_dir, MANIFEST_FILE, problems),
        config_text=config_text,
        config=config,
        header=header,
        rows=[r for r in rows if isinstance(r, dict)],
        explain=explain if isinstance(explain, dict) else None,
        model_meta=_read_json(run_dir, BEST_META, problems),
        audit=_read_json(run_dir, AUDIT_FILE, problems),
        problems=problems,
    )


# ------------------------------------------------------------------------------- values as printed


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value: object, digits: int = 4) -> str:
    """A metric as the page prints it: 4 decimals; '–' for undefined (null) or anything not a number."""
    return f"{value:.{digits}f}" if _is_number(value) else "–"


def fmt_interval(interval: object) -> str:
    """``[0.89, 0.94]``, or '' when there is none."""
    if isinstance(interval, (list, tuple)) and len(interval) == 2 and all(map(_is_number, interval)):
        return f"[{interval[0]:.2f}, {interval[1]:.2f}]"
    return ""


def pct(value: object, digits: int = 1) -> str:
    return f"{value:.{digits}%}" if _is_number(value) else "–"


def count(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "–"


def threshold(value: object) -> str:
    """4 decimals like every probability on the page; tiny thresholds in scientific notation."""
    if not _is_number(value):
        return "none"
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.1e}"


def plural(n: int, one: str, many: str = "") -> str:
    return f"{n:,} {one if n == 1 else many or one + 's'}"


def _get(data: Any, *keys: str) -> Any:
    """data[k1][k2]..., or None where a level is missing or not a dict."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _headline(metrics: Any, key: str) -> tuple[Any, Any]:
    """(value, interval) of a headline metric, from full metrics or a compact dict such as ``without_tta``
    (which carries ``macro_roc_auc`` itself rather than under ``macro``)."""
    if not isinstance(metrics, dict):
        return None, None
    intervals = metrics.get("intervals") if isinstance(metrics.get("intervals"), dict) else {}
    if key == "macro_roc_auc":
        value = metrics.get(key, _get(metrics, "macro", "roc_auc"))
        return value, intervals.get(key) or _get(intervals, "macro", "roc_auc")
    return metrics.get(key), intervals.get(key)


def _uses_tta(metrics: dict[str, Any]) -> bool:
    """Whether the reported probabilities average each image with its mirror image."""
    return bool(metrics.get("tta") or metrics.get("tta_hflip") or _get(metrics, "probabilities", "tta_hflip"))


def _level(run: RunRecord) -> str:
    level = _get(run.intervals, "settings", "level")
    return f"{level:.0%}" if _is_number(level) else "95%"


def _class_order(run: RunRecord, mapping: dict[str, Any]) -> list[str]:
    """The keys of a per-class mapping in manifest order, unknown names last."""
    return [c for c in run.classes if c in mapping] + [c for c in mapping if c not in run.classes]


# -------------------------------------------------------------------------------------------- images


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a complete PNG, None for anything else (a truncated file included)."""
    if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    if not data.rstrip(b"\0").endswith(_PNG_END):
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return (width, height) if width and height else None


def figure(run: RunRecord, path: Path | str, alt: str, caption: str = "") -> dict[str, Any]:
    """A PNG inlined as a data: URI, or the reason it is not shown (missing, unreadable, damaged)."""
    path = run.run_dir / path
    out = {"file": run.shown(path), "alt": alt, "caption": caption, "problem": None}
    if not path.is_file():
        return out | {"problem": NOT_WRITTEN}
    try:
        data = path.read_bytes()
    except OSError as e:
        return out | {"problem": f"could not be read ({e.strerror})"}
    size = png_size(data)
    if size is None:
        return out | {"problem": "not a complete PNG file (damaged or cut short)"}
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return out | {"uri": uri, "width": size[0], "height": size[1]}


def _result_plot(run: RunRecord, kind: str, default: str) -> Path:
    """Training's plot, or the one cxrdist.evaluate wrote beside its JSON (``eval_test_roc.png``)."""
    if run.metrics_file == run.run_dir / TEST_METRICS_FILE:
        return run.run_dir / default
    return run.metrics_file.with_name(f"{run.metrics_file.stem}_{kind}.png")


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
        counts = [_get(splits, s, "class_counts", name) for s in present]
        rows.append({"name": name, "counts": counts, "total": sum(c for c in counts if isinstance(c, int))})
    totals = [_get(splits, s, "count") for s in present]
    groups = [_get(splits, s, "groups") for s in present]
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
            ", ".join(f"{s} {fractions[s]:.0%}" for s in SPLITS if _is_number(fractions.get(s)))
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
    rows = [{"key": k, "label": label, **_value(*_headline(m, k))} for k, label in HEADLINE]
    return {
        "rows": rows,
        "level": _level(run),
        "num_samples": m.get("num_samples"),
        "best_epoch": m.get("best_epoch"),
        "epochs": len(run.rows),
        "model": _get(run.config, "model", "name"),
        "probabilities": _get(m, "probabilities", "source"),
        "tta": _uses_tta(m),
        "precision": m.get("mixed_precision") or m.get("precision"),
        "settings": (
            {k: settings.get(k) for k in ("level", "method", "resamples", "seed")}
            if isinstance(settings := _get(run.intervals, "settings"), dict)
            else None
        ),
        "metrics_file": run.shown(run.metrics_file),
        "from_evaluate": run.metrics_file != run.run_dir / TEST_METRICS_FILE,
        "other_evaluations": _other_evaluations(run),
    }


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
            found.append({"file": run.shown(path), "tta": _uses_tta(data), "split": data.get("split", "?")})
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
    speeds = [r["images_per_s"] for r in run.rows if _is_number(r.get("images_per_s"))]
    metric = _get(run.config, "train", "best_metric")
    out |= {
        "count": len(run.rows),
        "minutes": sum(r["epoch_seconds"] for r in run.rows if _is_number(r.get("epoch_seconds"))) / 60,
        "median_speed": statistics.median(speeds) if speeds else None,
        "best_metric": dict(HEADLINE).get(metric, metric) if metric else None,
    }
    return out


def gather_results(run: RunRecord) -> dict[str, Any]:
    m, ci = run.metrics, run.intervals
    rows = []
    for name in run.classes:
        row = _get(m, "per_class", name) or {}
        cells = [_value(row.get(k), _get(ci, "per_class", name, k)) for k, _ in CLASS_METRICS]
        rows.append({"name": name, "cells": cells, "support": row.get("support")})
    averages = [
        {"name": avg, "cells": [_value(_get(m, avg, k), _get(ci, avg, k)) for k, _ in CLASS_METRICS]}
        for avg in ("macro", "weighted")
    ]
    plot = _result_plot(run, "confusion", CONFUSION_PNG)
    caption = "Rows: true class; columns: predicted class."
    return {
        "labels": [label for _, label in CLASS_METRICS],
        "rows": rows,
        "averages": averages,
        "num_samples": m.get("num_samples"),
        "figure": figure(run, plot, "confusion matrix of the test split", caption),
    }


def gather_roc(run: RunRecord) -> dict[str, Any] | None:
    points = run.metrics.get("operating_points")
    plot = _result_plot(run, "roc", ROC_PNG)
    if not isinstance(points, dict) and not plot.exists():
        return None
    classes = []
    for name in _class_order(run, points if isinstance(points, dict) else {}):
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
        "null_threshold": any(not _is_number(p["threshold"]) for c in classes for p in c["points"] or []),
    }


def gather_calibration(run: RunRecord) -> dict[str, Any] | None:
    cal = run.metrics.get("calibration")
    plot = _result_plot(run, "reliability", RELIABILITY_PNG)
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
    meta = _get(run.model_meta, "calibration") or {}
    if not fitted_on and meta.get("temperature") == temperature:  # train keeps it with the model
        fitted_on = meta.get("fitted_on")
    measures = (("ece", "ECE"), ("brier", "Brier score"), ("nll", "NLL (nats)"))
    return out | {
        "rows": [
            {"key": k, "label": label, "before": _value(before.get(k)), "after": _value(_get(after, k))}
            for k, label in measures
        ],
        "has_after": isinstance(after, dict),
        "temperature": temperature if isinstance(after, dict) and _is_number(temperature) else None,
        "fitted_on": fitted_on,
        "n_bins": cal.get("n_bins", 15),
    }


def gather_tta(run: RunRecord) -> dict[str, Any] | None:
    m = run.metrics
    without = m.get("without_tta")
    if not isinstance(without, dict):
        return {"rows": None} if _uses_tta(m) else None
    rows = []
    for key, label in (*HEADLINE, ("loss", "loss (NLL)")):
        if key in without:
            (a, ci_a), (b, ci_b) = _headline(m, key), _headline(without, key)
            change = f"{a - b:+.4f}" if _is_number(a) and _is_number(b) else "–"
            rows.append({"key": key, "label": label, "with": _value(a, ci_a), "without": _value(b, ci_b),
                         "change": change})  # fmt: skip
    return {"rows": rows}


def _metric_rows(groups: dict[str, Any], first: str = "num_samples") -> tuple[list, list]:
    """(columns, rows) of headline metrics for named parts of the test split (subgroups, sources)."""
    parts = [g for g in groups.values() if isinstance(g, dict)]
    keys = [(k, label) for k, label in HEADLINE if any(_headline(g, k)[0] is not None for g in parts)]
    rows = [
        {"name": name, "n": _get(g, first), "cells": [_value(*_headline(g, k)) for k, _ in keys]}
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
    caption = "One row per true class; under each image its true class and the class the model predicted."
    per_class = explain.get("per_class") if explain else None
    rows = None
    if isinstance(per_class, dict):
        rows = []
        for name in _class_order(run, per_class):
            r = per_class[name] if isinstance(per_class[name], dict) else {}
            rows.append({"name": name, **{k: r.get(k) for k in ("images", "mean_outside_share", "accuracy")}})
    box = explain.get("lung_box") if explain else None
    return {
        "figure": figure(run, grid, f"Grad-CAM heat maps of {split} images, one row per true class", caption),
        "rows": rows,
        "summary_file": f"{GRADCAM_DIR}/{EXPLAIN_SUMMARY}",
        "box": box if isinstance(box, list) and len(box) == 4 and all(map(_is_number, box)) else None,
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
    for key, v in (audit.get("variants") or {}).items():
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
                    _value(*_headline(m, k)) for k in ("accuracy", "balanced_accuracy", "macro_roc_auc")
                ],
                "recalls": [
                    _value(_get(m, "per_class", c, "recall"), _get(ci, "per_class", c, "recall"))
                    for c in scored
                ],  # fmt: skip
                "confusion": _confusion(cm, classes),
            }
        )
    chance = {k: _get(audit, "chance", k) for k in ("accuracy", "balanced_accuracy")}
    margin = audit.get("margin") if _is_number(audit.get("margin")) else 0.0
    for v in variants:  # shade balanced accuracy that stays above chance without the lungs
        low = (v["cells"][1]["interval"] or [None])[0]
        bar = chance["balanced_accuracy"]
        v["flag"] = v["key"] != "intact" and _is_number(low) and _is_number(bar) and low > bar + margin
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
        "intervals": {k: _get(audit, "intervals", k) for k in ("method", "resamples", "seed", "level")},
        "mask_note": audit.get("mask_note") or "",
        "mask_source": audit.get("mask_source"),
        "flagged": bool(verdict.get("shortcut_suspected")),
        "verdict": verdict.get("line") or "The audit wrote no verdict.",
        "reasons": [r for r in verdict.get("reasons") or [] if isinstance(r, str)],
        "visible_fraction": visible.get("fraction"),
        "visible_note": visible.get("note") or "",
        "visible": figure(
            run, visible.get("image") or "audit_visible.png", "the part of the image the model sees"
        ),
        "examples": figure(run, "audit_examples.png", "one test image as each variant shows it to the model"),
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
        total = sum(n for n in r if _is_number(n))
        rows.append({"name": name, "cells": [(n, n / total if total and _is_number(n) else 0.0) for n in r]})
    return {"rows": rows}


def gather_card(run: RunRecord, data: dict[str, str], audit: dict[str, Any], has_gradcam: bool) -> dict:
    """The model card's facts; its prose is templates/model_card.html.j2."""
    m, ci, manifest = run.metrics, run.intervals, run.manifest or {}
    counts = []
    for name in run.classes:
        n = sum(c for s in SPLITS if isinstance(c := _get(manifest, "splits", s, "class_counts", name), int))
        counts.append(f"{name} {n:,}")
    headline = []
    for key, label in HEADLINE[:3]:
        interval = fmt_interval(ci.get(key))
        headline.append(f"{label} {fmt(m.get(key))}" + (f" {interval}" if interval else ""))
    recalls = []
    for name in run.classes:
        interval = fmt_interval(_get(ci, "per_class", name, "recall"))
        recalls.append(
            f"{name} {fmt(_get(m, 'per_class', name, 'recall'))}" + (f" {interval}" if interval else "")
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
        "level": _level(run),
    }


def _training_facts(run: RunRecord) -> list[str]:
    """How the model was trained, as short plain phrases (config.toml and its provenance header)."""
    cfg, facts = run.config, []
    model, pretrained = _get(cfg, "model", "name"), _get(cfg, "model", "pretrained")
    if model:
        weights = "" if pretrained is None else " from ImageNet weights" if pretrained else " from scratch"
        facts.append(f"{model} trained{weights}" if weights else str(model))
    epochs = _get(cfg, "train", "epochs")
    if run.rows or epochs:
        ran = f"{len(run.rows)} of {epochs}" if run.rows and epochs else f"{epochs or len(run.rows)}"
        facts.append(f"{ran} epochs, best epoch {run.metrics.get('best_epoch', '?')}")
    optim = _get(cfg, "optim")
    if isinstance(optim, dict) and optim.get("name"):
        lr, schedule = optim.get("lr", "?"), optim.get("schedule", "?")
        facts.append(f"{optim['name']}, learning rate {lr}, {schedule} schedule")
    if batch := _get(cfg, "train", "per_device_batch_size"):
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
    model = _get(run.config, "model", "name")
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


# -------------------------------------------------------------------------------------------- the page

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("cxrdist", "templates"),
    autoescape=True,  # every value is text; markup lives in the templates
    undefined=jinja2.StrictUndefined,  # a misspelt name is an error, not an empty cell
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_ENV.filters.update(num=fmt, interval=fmt_interval, pct=pct, count=count, threshold=threshold)
_ENV.globals.update(plural=plural, is_number=_is_number)


def render_report(run: RunRecord) -> str:
    """The whole page as one HTML string."""
    return _ENV.get_template("report.html.j2").render(gather(run))


def write_report(run_dir: Path, metrics_file: Path | None = None) -> Path:
    """Write ``run_dir/report.html`` atomically and return its path. `metrics_file`: show the JSON that
    ``cxrdist.evaluate`` wrote (with TTA, say) instead of training's test_metrics.json.

    Raises `ReportError` (exit 2) when `run_dir` is not a run directory or its metrics are missing or
    unreadable, `CxrdistError` (exit 1) when the page cannot be written.
    """
    run_dir = Path(run_dir)
    page = render_report(read_run(run_dir, metrics_file))
    path = run_dir / REPORT_FILE
    try:
        atomic_write_text(path, page)
    except OSError as e:
        raise CxrdistError(f"cannot write {path}: {e.strerror or e}") from None
    return path


# ------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cxrdist.report",
        description="Write RUN_DIR/report.html: the run on one self-contained page, with a model card.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory (the recipe's run.dir)")
    p.add_argument(
        "--metrics",
        type=Path,
        metavar="FILE",
        help="show this cxrdist.evaluate JSON (e.g. RUN_DIR/best/eval_test.json after evaluate --tta) "
        "instead of training's test_metrics.json; its plots beside it are used too",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(write_report(args.run_dir, args.metrics))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(run_main(main))
