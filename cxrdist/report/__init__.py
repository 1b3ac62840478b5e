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

The package only gathers: `record` reads the run folder (`RunRecord`), `gather` turns it into plain
dicts of values and plain text, one per section, and this module renders and writes the page. The
markup, its stylesheet and the model card's prose are Jinja2 templates in ``cxrdist/templates/``
(package data), rendered with autoescape on, so every string taken from a file is escaped by default.
The page is self-contained: images are base64 ``data:`` URIs, the stylesheet is inline, there is no
script and nothing is fetched. A section whose inputs are all absent is left out (the core ones are
named in one muted line under the contents); a missing or damaged image is one muted line. Values print
with 4 decimals and intervals with 2, as the terminal table (`cxrdist.tables`) does.

Only the standard library, jinja2 and shard_tools are imported (no torch, numpy or matplotlib).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import jinja2

from cxrdist.report.gather import gather
from cxrdist.report.record import (
    ReportError,
    RunRecord,
    count,
    fmt,
    fmt_interval,
    is_number,
    pct,
    plural,
    png_size,
    read_run,
    threshold,
)
from cxrdist.rundir import REPORT_FILE, run_dir_lock
from shard_tools.errors import EXIT_OK, CxrdistError
from shard_tools.files import atomic_write_text

__all__ = ["ReportError", "RunRecord", "fmt", "fmt_interval", "main", "png_size", "read_run", "render_report",
           "write_report"]  # fmt: skip

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
_ENV.globals.update(plural=plural, is_number=is_number)


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
    with run_dir_lock(args.run_dir, "report"):  # not while a training writes there
        print(write_report(args.run_dir, args.metrics))
    return EXIT_OK
