"""The run report: ``run.dir/report.html``, one page that shows a finished run to a person.

    python -m cxrdist.report RUN_DIR        # (re)writes RUN_DIR/report.html, prints its path

Reads what the run wrote; only ``test_metrics.json`` is required:

- ``config.toml``: the resolved recipe, shown as text; its ``# key: value`` header lines carry the
  provenance (cxrdist_version, git_commit, world_size, mixed_precision used).
- ``manifest.json``: ``classes``, ``splits.<split>.class_counts``, ``source``, ``command``, and, when
  ``pack --groups`` wrote them, the top-level ``groups`` and ``splits.<split>.groups`` (`shard_tools.schema`).
- ``metrics.jsonl``: one row per epoch (``epoch``, ``train_loss``, ``val``, ``lr``, ``epoch_seconds``, ...).
- ``test_metrics.json`` (`cxrdist.evaluate.full_metrics`): `cxrdist.metrics.summarize` keys, ``best_epoch``,
  ``provenance``, and optionally ``intervals`` (`cxrdist.uncertainty`), ``calibration``
  (`cxrdist.calibration`), ``operating_points`` (`cxrdist.operating_points`), ``probabilities`` {source,
  temperature, tta_hflip}, ``without_tta`` (headline metrics and intervals of the plain view),
  ``subgroups`` ({name: metrics with intervals}).
- ``best/meta.json``: ``calibration.fitted_on``, the split the temperature was fitted on.
- ``confusion_test.png``, ``curves.png``, ``roc_test.png``, ``reliability_test.png`` (`cxrdist.plots`);
  ``gradcam/explain_summary.json`` (its ``shards`` entry: `cxrdist.explain.explain_shards`) and
  ``gradcam/gradcam_grid_<split>.png``.

The page is self-contained: images are base64 ``data:`` URIs, the stylesheet is inline, there is no
script and nothing is fetched (not even a favicon). Every string taken from a file is HTML-escaped. A
section whose inputs are all absent is left out (the core ones are named in one muted line under the
contents); a missing or damaged image inside a section is one muted line, never a broken image. Values
print with 4 decimals and intervals with 2, as the terminal table (`cxrdist.tables`) does.

Only the standard library and shard_tools are imported (no torch, numpy or matplotlib): writing the report
takes milliseconds.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from cxrdist.rundir import (
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

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk and its CRC: a PNG cut short does not end with it

CITATIONS = (
    (
        "M. E. H. Chowdhury et al., “Can AI help in screening viral and COVID-19 pneumonia?”, "
        "IEEE Access 8 (2020) 132665–132676.",
        "https://doi.org/10.1109/ACCESS.2020.3010287",
    ),
    (
        "T. Rahman et al., “Exploring the effect of image enhancement techniques on COVID-19 detection "
        "using chest X-ray images”, Comput. Biol. Med. 132 (2021) 104319.",
        "https://doi.org/10.1016/j.compbiomed.2021.104319",
    ),
    (
        "A. J. DeGrave, J. D. Janizek, S.-I. Lee, “AI for radiographic COVID-19 detection selects "
        "shortcuts over signal”, Nature Machine Intelligence 3 (2021) 610–619.",
        "https://doi.org/10.1038/s42256-021-00338-7",
    ),
)

STYLE = """
body{font:15px/1.45 system-ui,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1b1b1b;
  max-width:64rem;margin:0 auto;padding:1rem 1.5rem 3rem}
h1{font-size:1.6rem;margin:.4rem 0}
h2{font-size:1.3rem;border-bottom:1px solid #bbb;padding-bottom:.15rem;margin-top:2.2rem}
h3{font-size:1.05rem;margin:1.2rem 0 .3rem}
p{margin:.45rem 0}
table{border-collapse:collapse;margin:.6rem 0;font-variant-numeric:tabular-nums}
th,td{padding:.25rem .65rem;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
thead th{border-bottom:2px solid #888;font-weight:600}
tbody th{font-weight:normal}
.num{text-align:right;white-space:nowrap}
tr.avg th,tr.avg td{font-weight:600}
tr.top th,tr.top td{border-top:2px solid #888}
tfoot th,tfoot td{font-weight:600;border-top:2px solid #888}
.ci{display:block;color:#666;font-size:.8em;font-weight:normal}
.muted{color:#767676;font-style:italic}
.warn{border-left:4px solid #a40000;background:#fbf1f1;padding:.5rem .8rem}
.note{color:#444;font-size:.92em}
figure{margin:1rem 0}
img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}
pre{background:#f5f5f5;padding:.7rem .9rem;font-size:.85em;white-space:pre-wrap;overflow-wrap:anywhere}
code{font-size:.92em}
dl{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem}
dt{color:#555}
dd{margin:0;overflow-wrap:anywhere}
nav ol{columns:2;margin:.3rem 0}
@media print{
  body{max-width:none;font-size:10.5pt;padding:0}
  nav{display:none}
  h2{break-after:avoid}
  figure,table,dl,.warn{break-inside:avoid}
  img{max-height:22cm;width:auto}
  a{color:inherit;text-decoration:none}
}
"""


class ReportError(InputError):
    """RUN_DIR is not a finished run's folder; the message names what is missing. Exit 2."""


@dataclass(frozen=True)
class Run:
    """What a run directory holds, read once. Absent optional files are None (or empty)."""

    run_dir: Path
    metrics: dict[str, Any]  # test_metrics.json
    manifest: dict[str, Any] | None
    config_text: str | None  # config.toml as written
    config: dict[str, Any]  # config.toml parsed ({} when absent or unparsable)
    header: dict[str, str]  # its "# key: value" lines
    rows: list[dict[str, Any]]  # metrics.jsonl
    explain: dict[str, Any] | None  # explain_summary.json's "shards" entry
    model_meta: dict[str, Any] | None  # best/meta.json (where the fitted temperature is recorded)
    problems: dict[str, str]  # file name -> why it could not be read

    @property
    def classes(self) -> list[str]:
        """Manifest order; test_metrics.json alone has its keys sorted (atomic_write_json)."""
        per_class = list((self.metrics.get("per_class") or {}).keys())
        listed = list((self.manifest or {}).get("classes") or [])
        return listed + [c for c in per_class if c not in listed]

    @property
    def intervals(self) -> dict[str, Any]:
        return self.metrics.get("intervals") or {}

    def provenance(self, key: str) -> str | None:
        return self.header.get(key) or (self.metrics.get("provenance") or {}).get(key)


# --------------------------------------------------------------------------------------------- reading


def _read_json(run_dir: Path, relative: str, problems: dict[str, str]) -> Any:
    """An optional JSON file: None when absent; when unreadable, None and a note in `problems`."""
    path = run_dir / relative
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        problems[relative] = f"could not be read ({e})"
        return None


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


def read_run(run_dir: Path) -> Run:
    """Read a run directory. Raises `ReportError` when it is not one or its test_metrics.json is missing
    or unreadable; any other file that is missing or unreadable only leaves its part of the page out."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ReportError(f"{run_dir}: no such folder; give a run directory (the recipe's run.dir)")
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is a file; give a run directory (the recipe's run.dir)")
    metrics_path = run_dir / TEST_METRICS_FILE
    if not metrics_path.is_file():
        if not any((run_dir / name).exists() for name in (CONFIG_FILE, MANIFEST_FILE, METRICS_FILE)):
            raise ReportError(
                f"{run_dir} is not a run directory: no {TEST_METRICS_FILE}, {CONFIG_FILE} or "
                f"{MANIFEST_FILE} in it"
            )
        raise ReportError(
            f"{run_dir}: no {TEST_METRICS_FILE}: has the run finished? (train writes it after the last epoch)"
        )
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ReportError(f"{metrics_path}: cannot be read as JSON ({e})") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("per_class"), dict):
        raise ReportError(f"{metrics_path}: not a metrics file written by cxrdist (no per_class table)")

    problems: dict[str, str] = {}
    manifest = _read_json(run_dir, MANIFEST_FILE, problems)
    if manifest is not None and not isinstance(manifest, dict):
        problems[MANIFEST_FILE], manifest = "is not a JSON object", None
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
    explain = summary.get("shards") if isinstance(summary, dict) else None
    model_meta = _read_json(run_dir, BEST_META, problems)
    return Run(
        run_dir=run_dir,
        metrics=metrics,
        manifest=manifest,
        config_text=config_text,
        config=config,
        header=header,
        rows=[r for r in rows if isinstance(r, dict)],
        explain=explain if isinstance(explain, dict) else None,
        model_meta=model_meta if isinstance(model_meta, dict) else None,
        problems=problems,
    )


# ------------------------------------------------------------------------------------- HTML pieces


def esc(value: object) -> str:
    """Text from a file, safe in element content and in quoted attributes."""
    return html.escape(str(value), quote=True)


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


def _pct(value: object) -> str:
    return f"{value:.1%}" if _is_number(value) else "–"


def _count(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "–"


def _plural(n: int, one: str, many: str = "") -> str:
    return f"{n:,} {one if n == 1 else many or one + 's'}"


def _value_cell(value: object, interval: object = None, digits: int = 4) -> str:
    """A right-aligned number with its interval on a second line."""
    ci = fmt_interval(interval)
    ci_html = f'<span class="ci">{ci}</span>' if ci else ""
    return f'<td class="num"><span class="v">{fmt(value, digits)}</span>{ci_html}</td>'


def _table(head: Sequence[str], rows: Sequence[str], *, table_id: str = "", foot: str = "") -> str:
    """`head`: header cells as HTML (a leading '#' marks a numeric column); `rows`: finished <tr>s."""
    cells = "".join(f'<th class="num">{h[1:]}</th>' if h.startswith("#") else f"<th>{h}</th>" for h in head)
    ident = f' id="{table_id}"' if table_id else ""
    tfoot = f"<tfoot>{foot}</tfoot>" if foot else ""
    return f"<table{ident}><thead><tr>{cells}</tr></thead><tbody>{''.join(rows)}</tbody>{tfoot}</table>"


def _muted(text: str) -> str:
    return f'<p class="muted">{text}</p>'


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a complete PNG, None for anything else (a truncated file included)."""
    if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    if not data.rstrip(b"\0").endswith(_PNG_END):
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return (width, height) if width and height else None


def _figure(run: Run, relative: str, alt: str, caption: str = "") -> str:
    """The PNG inlined as a data: URI, or one muted line naming the file when it is missing or damaged."""
    path = run.run_dir / relative
    if not path.is_file():
        return _muted(f"<code>{esc(relative)}</code>: {NOT_WRITTEN}")
    try:
        data = path.read_bytes()
    except OSError as e:
        return _muted(f"<code>{esc(relative)}</code>: could not be read ({esc(e.strerror)})")
    size = png_size(data)
    if size is None:
        return _muted(f"<code>{esc(relative)}</code>: not a complete PNG file (damaged or cut short)")
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return (
        f'<figure><img src="{uri}" alt="{esc(alt)}" width="{size[0]}" height="{size[1]}" '
        f'data-file="{esc(relative)}">{cap}</figure>'
    )


def _get(data: Any, *keys: str) -> Any:
    """data[k1][k2]..., or None where a level is missing or not a dict."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _headline(metrics: dict[str, Any], key: str) -> tuple[Any, Any]:
    """(value, interval) of a headline metric, from full metrics or a compact dict such as ``without_tta``
    (which carries ``macro_roc_auc`` itself rather than under ``macro``)."""
    intervals = metrics.get("intervals") if isinstance(metrics.get("intervals"), dict) else {}
    if key == "macro_roc_auc":
        value = metrics.get(key, _get(metrics, "macro", "roc_auc"))
        return value, intervals.get(key) or _get(intervals, "macro", "roc_auc")
    return metrics.get(key), intervals.get(key)


def _uses_tta(metrics: dict[str, Any]) -> bool:
    """Whether the reported probabilities average each image with its mirror image."""
    return bool(metrics.get("tta") or metrics.get("tta_hflip") or _get(metrics, "probabilities", "tta_hflip"))


def _interval_note(run: Run) -> str:
    settings = run.intervals.get("settings")
    if not isinstance(settings, dict):
        return "No intervals in test_metrics.json (bootstrap off, or a run from before intervals existed)."
    level = settings.get("level", 0.95)
    return (
        f"Intervals: {_pct_level(level)} {esc(settings.get('method', 'bootstrap'))}, "
        f"{esc(settings.get('resamples', '?'))} resamples, seed {esc(settings.get('seed', '?'))}. "
        "Images are resampled, not patients: with several images per patient the true uncertainty is larger."
    )


def _pct_level(level: object) -> str:
    return f"{level:.0%}" if _is_number(level) else "95%"


def _level(run: Run) -> str:
    return _pct_level(_get(run.intervals, "settings", "level") or 0.95)


# ---------------------------------------------------------------------------------------- sections


def section_summary(run: Run) -> str:
    """Headline metrics with intervals, and what they were measured on."""
    m = run.metrics
    rows = []
    for key, label in HEADLINE:
        value, interval = _headline(m, key)
        rows.append(
            f'<tr data-metric="{key}"><th>{label}</th><td class="num value">{fmt(value)}</td>'
            f'<td class="num interval">{fmt_interval(interval) or "–"}</td></tr>'
        )
    table = _table(["metric", "#test split", f"#{_level(run)} interval"], rows, table_id="summary")
    facts = [f"{_count(m.get('num_samples'))} test images"]
    if m.get("best_epoch") is not None:
        facts.append(f"best epoch {esc(m['best_epoch'])}" + (f" of {len(run.rows)}" if run.rows else ""))
    model = _get(run.config, "model", "name")
    if model:
        facts.append(f"model <code>{esc(model)}</code>")
    source = _get(m, "probabilities", "source")
    if source:
        facts.append(f"probabilities: {esc(source)}")
    elif _uses_tta(m):
        facts.append("probabilities averaged with the mirrored image's (test-time augmentation)")
    return f"{table}<p class=note>{'; '.join(facts)}.</p><p class=note>{_interval_note(run)}</p>"


def section_data(run: Run) -> str:
    """Images per class and split, where they came from, duplicates and groups."""
    manifest = run.manifest
    if manifest is None:
        return ""
    splits = manifest.get("splits") if isinstance(manifest.get("splits"), dict) else {}
    present = [s for s in SPLITS if isinstance(splits.get(s), dict)]
    rows = []
    for name in run.classes:
        counts = [_get(splits, s, "class_counts", name) for s in present]
        total = sum(c for c in counts if isinstance(c, int))
        cells = "".join(f'<td class="num">{_count(c)}</td>' for c in counts)
        rows.append(
            f'<tr data-class="{esc(name)}"><th>{esc(name)}</th>{cells}<td class="num">{total:,}</td></tr>'
        )
    totals = [_get(splits, s, "count") for s in present]
    grand = sum(c for c in totals if isinstance(c, int))
    foot = "<tr><th>all classes</th>" + "".join(f'<td class="num">{_count(c)}</td>' for c in totals)
    foot += f'<td class="num">{grand:,}</td></tr>'
    groups = [_get(splits, s, "groups") for s in present]
    if any(isinstance(g, list) for g in groups):
        sizes = [_count(len(g)) if isinstance(g, list) else "–" for g in groups]
        cells = "".join(f'<td class="num">{n}</td>' for n in sizes)
        foot += f'<tr data-row="groups"><th>groups (patients)</th>{cells}<td class="num">'
        foot += f"{sum(len(g) for g in groups if isinstance(g, list)):,}</td></tr>"
    table = _table(["class", *(f"#{s}" for s in present), "#all"], rows, table_id="data-counts", foot=foot)

    facts = []
    if manifest.get("source"):
        facts.append(("source", f"<code>{esc(manifest['source'])}</code>"))
    command = manifest.get("command")
    if isinstance(command, list) and command:
        facts.append(("packed with", f"<code>{esc(shlex.join(str(a) for a in command))}</code>"))
    else:
        facts.append(("packed with", '<span class="muted">command not recorded</span>'))
    if manifest.get("image_size"):
        facts.append(("image size", f"{esc(manifest['image_size'])} px square, 8-bit gray"))
    fractions = manifest.get("split_fractions")
    if isinstance(fractions, dict):
        shares = ", ".join(f"{s} {fractions[s]:.0%}" for s in SPLITS if _is_number(fractions.get(s)))
        facts.append(("split", f"{shares} per class, seed {esc(manifest.get('seed', '?'))}"))
    duplicates = manifest.get("duplicates")
    if isinstance(duplicates, list):
        dropped = sum(len(d.get("dropped") or []) for d in duplicates if isinstance(d, dict))
        text = f"{_plural(len(duplicates), 'set')} of pixel-identical images, each kept inside one split"
        facts.append(
            ("duplicates", text + (f"; {_plural(dropped, 'copy', 'copies')} dropped" if dropped else ""))
        )
    skipped = manifest.get("skipped")
    if isinstance(skipped, list):
        facts.append(("skipped", f"{_plural(len(skipped), 'file')} unreadable or unsupported"))
    group_info = manifest.get("groups")
    if isinstance(group_info, dict):
        own = group_info.get("own_groups")
        text = f"whole groups per split, from <code>{esc(group_info.get('file', '?'))}</code>"
        if _is_number(own) and own:
            text += f"; {_count(own)} images not in the file formed a group each"
        facts.append(("grouping", text))
    else:
        facts.append(("grouping", "none recorded: images of one patient may sit in different splits"))
    if manifest.get("tool_version"):
        facts.append(("shard_tools", esc(manifest["tool_version"])))
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    return f"{table}<dl>{dl}</dl>"


def _epoch_row(label: str, row: dict[str, Any]) -> str:
    val = row.get("val") if isinstance(row.get("val"), dict) else {}
    cells = [
        _value_cell(row.get("train_loss")),
        _value_cell(val.get("loss")),
        _value_cell(val.get("accuracy")),
        _value_cell(val.get("macro_f1")),
        f'<td class="num">{row["lr"]:.3g}</td>' if _is_number(row.get("lr")) else '<td class="num">–</td>',
    ]
    return f"<tr><th>{label} ({esc(row.get('epoch', '?'))})</th>{''.join(cells)}</tr>"


def section_training(run: Run) -> str:
    """Curves, and the best and last epochs' numbers."""
    if not run.rows and not (run.run_dir / CURVES_PNG).exists():
        return ""
    parts = [_figure(run, CURVES_PNG, "training curves: loss, validation accuracy and macro F1 per epoch")]
    if run.rows:
        best_epoch = run.metrics.get("best_epoch")
        best = next((r for r in run.rows if r.get("epoch") == best_epoch), None)
        last = run.rows[-1]
        rows = []
        if best is not None and best is not last:
            rows.append(_epoch_row("best epoch", best))
        rows.append(_epoch_row("last epoch, best" if best is last else "last epoch", last))
        head = ["epoch", "#train loss", "#val loss", "#val accuracy", "#val macro F1", "#learning rate"]
        parts.append(_table(head, rows, table_id="epochs"))
        seconds = sum(r.get("epoch_seconds", 0) for r in run.rows if _is_number(r.get("epoch_seconds")))
        speeds = [r["images_per_s"] for r in run.rows if _is_number(r.get("images_per_s"))]
        note = f"{len(run.rows)} epochs in {seconds / 60:.1f} min of training"
        if speeds:
            note += f", median {statistics.median(speeds):,.0f} training images/s"
        metric = _get(run.config, "train", "best_metric")
        if metric:
            label = dict(HEADLINE).get(metric, metric)
            note += f"; the best epoch is the one with the highest validation {esc(label)}"
            note += " (lowest, for loss)" if metric == "loss" else ""
        parts.append(f"<p class=note>{note}.</p>")
    elif METRICS_FILE in run.problems:
        parts.append(_muted(f"<code>{METRICS_FILE}</code> {esc(run.problems[METRICS_FILE])}"))
    return "".join(parts)


def section_results(run: Run) -> str:
    """Per-class table with intervals, averages, and the confusion matrix."""
    m, ci = run.metrics, run.intervals
    head = ["class", *(f"#{label}" for _, label in CLASS_METRICS), "#images"]
    rows = []
    for name in run.classes:
        row = _get(m, "per_class", name) or {}
        cells = "".join(_value_cell(row.get(k), _get(ci, "per_class", name, k)) for k, _ in CLASS_METRICS)
        support = f'<td class="num">{_count(row.get("support"))}</td>'
        rows.append(f'<tr data-class="{esc(name)}"><th>{esc(name)}</th>{cells}{support}</tr>')
    for avg in ("macro", "weighted"):
        cells = "".join(_value_cell(_get(m, avg, k), _get(ci, avg, k)) for k, _ in CLASS_METRICS)
        total = f'<td class="num">{_count(m.get("num_samples"))}</td>'
        top = " top" if avg == "macro" else ""
        rows.append(f'<tr class="avg{top}" data-avg="{avg}"><th>{avg} average</th>{cells}{total}</tr>')
    explain = (
        "<p class=note>Each value has its interval under it. Recall is the share of a class's images "
        "the model calls that class (sensitivity); specificity the share of the other images it does not; "
        "ROC-AUC is one class against the rest. – marks an undefined value (a class never predicted has no "
        "precision).</p>"
    )
    caption = "Rows: true class; columns: predicted class."
    confusion = _figure(run, CONFUSION_PNG, "confusion matrix of the test split", caption)
    return _table(head, rows, table_id="per-class") + explain + confusion


def _class_order(run: Run, mapping: dict[str, Any]) -> list[str]:
    """The keys of a per-class mapping in manifest order, unknown names last."""
    return [c for c in run.classes if c in mapping] + [c for c in mapping if c not in run.classes]


def _threshold(value: object) -> str:
    """4 decimals like every probability on the page; tiny thresholds in scientific notation."""
    if not _is_number(value):
        return "none"
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.1e}"


def _target(text: object) -> str:
    """``specificity>=0.90`` as ``specificity ≥ 0.90``."""
    return esc(text).replace("&gt;=", " ≥ ")


def section_roc(run: Run) -> str:
    """ROC curves and the operating points table."""
    points = run.metrics.get("operating_points")
    if not isinstance(points, dict) and not (run.run_dir / ROC_PNG).exists():
        return ""
    parts = [_figure(run, ROC_PNG, "one-vs-rest ROC curves with the operating points marked")]
    if not isinstance(points, dict):
        parts.append(_muted(f"operating points: {NOT_WRITTEN}"))
        return "".join(parts)
    rows, null_threshold = [], False
    for name in _class_order(run, points):
        entry = points[name]
        label = f"<th>{esc(name)}</th>"
        if not isinstance(entry, dict) or not entry.get("points"):
            rows.append(
                f'<tr data-class="{esc(name)}">{label}<td colspan="5" class="muted">no curve: the class is '
                "absent from the test split, or alone in it</td></tr>"
            )
            continue
        for i, p in enumerate(entry["points"]):
            null_threshold |= not _is_number(p.get("threshold"))
            first = i == 0
            lead = (
                f'<th rowspan="{len(entry["points"])}">{esc(name)}<span class="ci">'
                f"AUC {fmt(entry.get('auc'))}; {_count(entry.get('positives'))} positive, "
                f"{_count(entry.get('negatives'))} negative</span></th>"
                if first
                else ""
            )
            rows.append(
                f'<tr data-class="{esc(name)}" data-target="{esc(p.get("target", ""))}">{lead}'
                f"<td>{_target(p.get('target', '?'))}</td>"
                f'<td class="num">{_threshold(p.get("threshold"))}</td>'
                f"{_value_cell(p.get('sensitivity'), p.get('sensitivity_interval'))}"
                f"{_value_cell(p.get('specificity'), p.get('specificity_interval'))}</tr>"
            )
    head = ["class", "target", "#threshold", "#sensitivity", "#specificity"]
    parts.append(_table(head, rows, table_id="operating-points"))
    note = (
        "Call an image positive for a class when its probability is at least the threshold. "
        "specificity ≥ X: the threshold with the highest sensitivity that keeps specificity at least X (few "
        "false alarms); sensitivity ≥ X: the highest specificity that misses at most 1&minus;X of the class "
        "(screening). Under each class: its AUC and its positive and negative test images. The thresholds "
        "are chosen on the test split itself, so they are optimistic: choose one on the validation split "
        "before relying on it."
    )
    if null_threshold:
        note += " <em>none</em>: only calling nothing positive meets the target (too few negatives)."
    parts.append(f"<p class=note>{note}</p>")
    return "".join(parts)


def section_calibration(run: Run) -> str:
    """Reliability diagram, ECE / Brier / NLL before and after temperature scaling."""
    cal = run.metrics.get("calibration")
    if not isinstance(cal, dict) and not (run.run_dir / RELIABILITY_PNG).exists():
        return ""
    parts = [_figure(run, RELIABILITY_PNG, "reliability diagram: accuracy against confidence per bin")]
    if not isinstance(cal, dict):
        parts.append(_muted(f"calibration numbers: {NOT_WRITTEN}"))
        return "".join(parts)
    before, after = cal.get("before") or {}, cal.get("after")
    rows = []
    for key, label in (("ece", "ECE"), ("brier", "Brier score"), ("nll", "NLL (nats)")):
        after_cell = _value_cell(_get(after, key)) if isinstance(after, dict) else ""
        rows.append(
            f'<tr data-metric="{key}"><th>{label}</th>{_value_cell(before.get(key))}{after_cell}</tr>'
        )
    head = ["measure", "#model"] + (["#after temperature"] if isinstance(after, dict) else [])
    parts.append(_table(head, rows, table_id="calibration"))
    temperature = cal.get("temperature")
    if isinstance(after, dict) and _is_number(temperature):
        where = _fitted_on(run, temperature)
        fitted = f", fitted on the {esc(where)} split" if where else ""
        parts.append(f'<p>Temperature <span id="temperature">{temperature:.3f}</span>{fitted}.</p>')
    else:
        parts.append(_muted("no temperature was fitted"))
    parts.append(
        "<p class=note>A calibrated model is right about 80% of the time when it says 80%. ECE is the "
        f"average gap between confidence and accuracy over {esc(cal.get('n_bins', 15))} confidence bins "
        "(0 is perfect); Brier the mean squared error of the probabilities (0 perfect, 2 worst); NLL the "
        "mean negative log-probability of the true class. Temperature scaling divides the logits by one "
        "number: it changes the probabilities, never the predicted class.</p>"
    )
    return "".join(parts)


def _fitted_on(run: Run, temperature: float) -> str | None:
    """The split the temperature was fitted on: in test_metrics.json, or in best/meta.json (train keeps
    it there for evaluate and predict) when that is the same temperature."""
    cal = run.metrics["calibration"]
    if cal.get("temperature_fitted_on"):
        return cal["temperature_fitted_on"]
    meta = _get(run.model_meta, "calibration") or {}
    return meta.get("fitted_on") if meta.get("temperature") == temperature else None


def section_tta(run: Run) -> str:
    """With and without test-time augmentation, when the run measured both."""
    m = run.metrics
    without = m.get("without_tta")
    if not isinstance(without, dict):
        if _uses_tta(m):
            return (
                "<p>Every result on this page averages the predictions for each test image and its mirror "
                "image. The run did not record the results without it.</p>"
            )
        return ""
    rows = []
    for key, label in (*HEADLINE, ("loss", "loss (NLL)")):
        if key not in without:
            continue
        (a, ci_a), (b, ci_b) = _headline(m, key), _headline(without, key)
        change = f"{a - b:+.4f}" if _is_number(a) and _is_number(b) else "–"
        rows.append(
            f'<tr data-metric="{key}"><th>{label}</th>{_value_cell(a, ci_a)}{_value_cell(b, ci_b)}'
            f'<td class="num">{change}</td></tr>'
        )
    head = ["metric", "#with TTA", "#without TTA", "#change"]
    note = (
        "<p class=note>Test-time augmentation: each test image's probabilities are averaged with those of "
        "its mirror image. Changes well inside the intervals are not evidence of a difference.</p>"
    )
    return _table(head, rows, table_id="tta") + note


def section_subgroups(run: Run) -> str:
    """Results per subgroup (for instance per source or per sex), when the run computed them."""
    groups = run.metrics.get("subgroups")
    if not isinstance(groups, dict) or not groups:
        return ""
    parts = [g for g in groups.values() if isinstance(g, dict)]
    keys = [(k, label) for k, label in HEADLINE if any(_headline(g, k)[0] is not None for g in parts)]
    rows = []
    for name, g in groups.items():
        g = g if isinstance(g, dict) else {}
        cells = "".join(_value_cell(*_headline(g, k)) for k, _ in keys)
        rows.append(
            f'<tr data-subgroup="{esc(name)}"><th>{esc(name)}</th>'
            f'<td class="num">{_count(g.get("num_samples"))}</td>{cells}</tr>'
        )
    head = ["subgroup", "#images", *(f"#{label}" for _, label in keys)]
    note = (
        "<p class=note>The same model on each part of the test split. Small subgroups have wide intervals; "
        "a gap between subgroups can come from the subgroups' class mix as well as from the model.</p>"
    )
    return _table(head, rows, table_id="subgroups") + note


def section_gradcam(run: Run) -> str:
    """The Grad-CAM grid and the heat-map share outside the lung box per class."""
    explain = run.explain
    split = explain.get("split", "test") if explain else "test"
    grid = f"{GRADCAM_DIR}/gradcam_grid_{split}.png"
    if explain is None and not (run.run_dir / grid).exists():
        return ""
    parts = [
        _figure(
            run,
            grid,
            f"Grad-CAM heat maps of {split} images, one row per true class",
            "One row per true class; caption: true &gt; predicted class. White box: the central lung box.",
        )
    ]
    per_class = explain.get("per_class") if explain else None
    if isinstance(per_class, dict):
        rows = []
        for name in _class_order(run, per_class):
            r = per_class[name] if isinstance(per_class[name], dict) else {}
            rows.append(
                f'<tr data-class="{esc(name)}"><th>{esc(name)}</th>'
                f'<td class="num">{_count(r.get("images"))}</td>'
                f'<td class="num">{_pct(r.get("mean_outside_share"))}</td>'
                f'<td class="num">{_pct(r.get("accuracy"))}</td></tr>'
            )
        head = ["true class", "#images", "#mean share outside the lung box", "#accuracy on these images"]
        parts.append(_table(head, rows, table_id="gradcam"))
    else:
        parts.append(_muted(f"<code>{GRADCAM_DIR}/{EXPLAIN_SUMMARY}</code>: {NOT_WRITTEN}"))
    box = explain.get("lung_box") if explain else None
    where = ""
    if isinstance(box, list) and len(box) == 4 and all(map(_is_number, box)):
        where = f" ({box[0]:.0%} to {box[2]:.0%} of the width, {box[1]:.0%} to {box[3]:.0%} of the height)"
    parts.append(
        "<p class=note>Grad-CAM shows which regions pushed the model towards the class it predicted. The "
        "share is the fraction of each heat map's mass that lies outside a fixed central box meant to hold "
        f"both lungs{where}, averaged over the images of a class. A high share means the evidence sits on "
        "borders, corners, text or the neck, where hospital markers and labels live, and deserves a look. "
        "It is an indicator, not a test: a high share is no proof of a shortcut and a low one no proof of "
        "its absence. The box is a crude stand-in for a lung segmentation, Grad-CAM is as coarse as the "
        "model's last feature map, it shows where the evidence is but not what it is, and these are only a "
        "few images per class.</p>"
    )
    return "".join(parts)


def _headline_sentence(run: Run) -> str:
    m, ci = run.metrics, run.intervals
    parts = []
    for key, label in HEADLINE[:3]:
        interval = fmt_interval(ci.get(key))
        parts.append(f"{label} {fmt(m.get(key))}" + (f" {interval}" if interval else ""))
    recalls = []
    for name in run.classes:
        value = _get(m, "per_class", name, "recall")
        interval = fmt_interval(_get(ci, "per_class", name, "recall"))
        recalls.append(f"{esc(name)} {fmt(value)}" + (f" {interval}" if interval else ""))
    text = f"On {_count(m.get('num_samples'))} test images: {', '.join(parts)}"
    text += f" ({_level(run)} intervals in brackets). " if ci.get("settings") else ". "
    return text + f"Recall (sensitivity) per class: {'; '.join(recalls)}."


def _training_sentence(run: Run) -> str:
    cfg, m = run.config, run.metrics
    model = _get(cfg, "model", "name")
    pretrained = _get(cfg, "model", "pretrained")
    bits = []
    if model:
        weights = "from ImageNet weights" if pretrained else "from scratch"
        bits.append(f"<code>{esc(model)}</code> trained {weights}" if pretrained is not None else esc(model))
    epochs = _get(cfg, "train", "epochs")
    if run.rows or epochs:
        ran = f"{len(run.rows)} of {esc(epochs)}" if run.rows and epochs else esc(epochs or len(run.rows))
        bits.append(f"{ran} epochs, best epoch {esc(m.get('best_epoch', '?'))}")
    optim = _get(cfg, "optim")
    if isinstance(optim, dict) and optim.get("name"):
        bits.append(
            f"{esc(optim['name'])}, learning rate {esc(optim.get('lr', '?'))}, "
            f"{esc(optim.get('schedule', '?'))} schedule"
        )
    batch = _get(cfg, "train", "per_device_batch_size")
    world = run.header.get("world_size")
    if batch:
        bits.append(f"{esc(batch)} images per device per step")
    if world:
        bits.append(f"{esc(world)} process(es)")
    precision = run.header.get("mixed_precision used")
    if precision:
        bits.append(f"mixed precision {esc(precision)}")
    version, commit = run.provenance("cxrdist_version"), run.provenance("git_commit")
    if version or commit:
        bits.append(f"cxrdist {esc(version or '?')}, commit <code>{esc(commit or '?')}</code>")
    return "; ".join(bits) + "." if bits else "not recorded (no config.toml)."


def section_model_card(run: Run) -> str:
    """Intended use, data, known shortcut risks, metrics, training: the short model card."""
    counts = []
    manifest = run.manifest or {}
    for name in run.classes:
        n = sum(c for s in SPLITS if isinstance(c := _get(manifest, "splits", s, "class_counts", name), int))
        counts.append(f"{esc(name)} {n:,}")
    source = manifest.get("source")
    origin = f" from <code>{esc(source)}</code>" if source else ""
    used = (
        f"This run used {', '.join(counts)} images{origin} (train, validation and test together; per "
        "split under Data)."
        if run.manifest
        else "The manifest of this run is missing, so the images it used are unknown."
    )
    gradcam = (
        "The Grad-CAM section above is a first look for such shortcuts, not a proof either way."
        if section_gradcam(run)
        else "This run has no Grad-CAM audit: <code>python -m cxrdist.explain</code> gives a first look for "
        "such shortcuts."
    )
    refs = "".join(
        f'<li>{esc(text)} <a href="{url}">{url.removeprefix("https://")}</a></li>' for text, url in CITATIONS
    )
    return f"""
<h3>Intended use</h3>
<p>Research and teaching on the public COVID-19 Radiography Database: comparing training set-ups, measuring
uncertainty and calibration, auditing shortcut learning. <strong>Not for diagnosis, triage, screening or any
other clinical use.</strong> It is not a medical device and has never been validated on patients of any
hospital.</p>
<h3>Data</h3>
<p>Built for the COVID-19 Radiography Database (Kaggle): chest radiographs labelled COVID, Lung_Opacity,
Normal and Viral Pneumonia, gathered by the database's authors from public sources (references 1 and 2).
Its labels are the folders an image was filed in, not a diagnosis confirmed for each image. {used}</p>
<h3>Known shortcut risks</h3>
<ul>
<li>Viral Pneumonia images are largely paediatric: a model can tell them apart by a child's anatomy (body
size, proportions) rather than by pneumonia (reference 3).</li>
<li>Some COVID images carry burned-in hospital markers, text and annotations that a model can learn instead of
lung findings.</li>
<li>Each class comes from a handful of sources, so the source (scanner, processing, hospital) is confounded
with the label; a high test score on the same sources says little about a new hospital (reference 3).</li>
<li>The database holds duplicates and near-duplicates; identical images are kept in one split by the packer,
but near-duplicates and several images of one patient can still sit on both sides unless the shards were
packed with patient groups.</li>
</ul>
<p>{gradcam}</p>
<h3>Metrics</h3>
<p>{_headline_sentence(run)}</p>
<h3>Training</h3>
<p>{_training_sentence(run)}</p>
<h3>References</h3>
<ol>{refs}</ol>
"""


def section_recipe(run: Run) -> str:
    """The resolved recipe as written, header comments included."""
    if run.config_text is None:
        return ""
    note = ""
    if CONFIG_FILE in run.problems:
        note = _muted(f"<code>{CONFIG_FILE}</code> {esc(run.problems[CONFIG_FILE])}")
    return (
        f"<p class=note>Exactly as the run wrote it (<code>{CONFIG_FILE}</code>); the comment lines at the "
        f"top are its provenance. It is a recipe: <code>python -m cxrdist.train {CONFIG_FILE} --set "
        "run.dir=NEW_DIR</code> trains it again.</p>"
        f"{note}<pre id=recipe>{esc(run.config_text)}</pre>"
    )


@dataclass(frozen=True)
class Section:
    ident: str
    title: str
    render: Callable[[Run], str]
    core: bool  # a run normally has it: named under the contents when it is missing


SECTIONS = (
    Section("summary", "Summary", section_summary, True),
    Section("data", "Data", section_data, True),
    Section("training", "Training", section_training, True),
    Section("results", "Test results per class", section_results, True),
    Section("roc", "ROC curves and operating points", section_roc, True),
    Section("calibration", "Calibration", section_calibration, True),
    Section("tta", "Test-time augmentation", section_tta, False),
    Section("subgroups", "Subgroups", section_subgroups, False),
    Section("gradcam", "Grad-CAM: where the model looks", section_gradcam, True),
    Section("model-card", "Model card", section_model_card, True),
    Section("recipe", "Recipe", section_recipe, True),
)


def render_report(run: Run) -> str:
    """The whole page as one HTML string."""
    body, nav, missing = [], [], []
    for section in SECTIONS:
        content = section.render(run)
        if not content:
            if section.core:
                missing.append(section.title)
            continue
        nav.append(f'<li><a href="#{section.ident}">{section.title}</a></li>')
        body.append(f'<section id="{section.ident}"><h2>{section.title}</h2>{content}</section>')
    notes = []
    if missing:
        hint = ""
        if "Grad-CAM: where the model looks" in missing:
            where = esc(run.run_dir)
            hint = (
                f" (add Grad-CAM with <code>python -m cxrdist.explain {where} --shards SHARDS --out "
                f"{where}/{GRADCAM_DIR}</code>, then <code>python -m cxrdist.report {where}</code>)"
            )
        notes.append(_muted(f"Not in this run: {', '.join(missing)}{hint}."))
    for name, problem in sorted(run.problems.items()):
        notes.append(_muted(f"<code>{esc(name)}</code> {esc(problem)}; its part of the page is left out."))
    model = _get(run.config, "model", "name")
    title = f"cxrdist run report: {run.run_dir.resolve().name}"
    version, commit = run.provenance("cxrdist_version"), run.provenance("git_commit")
    byline = f"<code>{esc(model)}</code>, run directory " if model else "Run directory "
    byline += f"<code>{esc(run.run_dir.resolve())}</code>"
    if version or commit:
        byline += f"; cxrdist {esc(version or '?')}, commit <code>{esc(commit or '?')}</code>"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<link rel="icon" href="data:,">
<style>{STYLE}</style>
</head>
<body>
<header>
<h1>{esc(title)}</h1>
<p class=note>{byline}.</p>
<p class="warn">Research use only. This model was trained on a public research database and must not be used
for diagnosis or any clinical decision (see the model card).</p>
</header>
<nav><ol>{"".join(nav)}</ol>{"".join(notes)}</nav>
{"".join(body)}
</body>
</html>
"""


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` atomically and return its path.

    Raises `ReportError` (exit 2) when `run_dir` is not a run directory or has no readable
    test_metrics.json, `CxrdistError` (exit 1) when the page cannot be written.
    """
    run_dir = Path(run_dir)
    page = render_report(read_run(run_dir))
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
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(write_report(args.run_dir))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(run_main(main))
