"""Reading a finished run directory for the report: `RunRecord` and `read_run`, and the values as the page
prints them (4 decimals, intervals with 2, '–' for undefined) and its images (inlined PNGs).

Standard library and shard_tools only: the report stays light (no torch, numpy or matplotlib).
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from cxrdist.rundir import (
    AUDIT_FILE,
    BEST_META,
    CONFIG_FILE,
    EXPLAIN_SUMMARY,
    GRADCAM_DIR,
    MANIFEST_FILE,
    METRICS_FILE,
    TEST_METRICS_FILE,
)
from shard_tools.errors import InputError

NOT_WRITTEN = "not written by this run"

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


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value: object, digits: int = 4) -> str:
    """A metric as the page prints it: 4 decimals; '–' for undefined (null) or anything not a number."""
    return f"{value:.{digits}f}" if is_number(value) else "–"


def fmt_interval(interval: object) -> str:
    """``[0.89, 0.94]``, or '' when there is none."""
    if isinstance(interval, (list, tuple)) and len(interval) == 2 and all(map(is_number, interval)):
        return f"[{interval[0]:.2f}, {interval[1]:.2f}]"
    return ""


def pct(value: object, digits: int = 1) -> str:
    return f"{value:.{digits}%}" if is_number(value) else "–"


def count(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "–"


def threshold(value: object) -> str:
    """4 decimals like every probability on the page; tiny thresholds in scientific notation."""
    if not is_number(value):
        return "none"
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.1e}"


def plural(n: int, one: str, many: str = "") -> str:
    return f"{n:,} {one if n == 1 else many or one + 's'}"


def get(data: Any, *keys: str) -> Any:
    """data[k1][k2]..., or None where a level is missing or not a dict."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def headline(metrics: Any, key: str) -> tuple[Any, Any]:
    """(value, interval) of a headline metric, from full metrics or a compact dict such as ``without_tta``
    (which carries ``macro_roc_auc`` itself rather than under ``macro``)."""
    if not isinstance(metrics, dict):
        return None, None
    intervals = metrics.get("intervals") if isinstance(metrics.get("intervals"), dict) else {}
    if key == "macro_roc_auc":
        value = metrics.get(key, get(metrics, "macro", "roc_auc"))
        return value, intervals.get(key) or get(intervals, "macro", "roc_auc")
    return metrics.get(key), intervals.get(key)


def uses_tta(metrics: dict[str, Any]) -> bool:
    """Whether the reported probabilities average each image with its mirror image."""
    return bool(metrics.get("tta") or metrics.get("tta_hflip") or get(metrics, "probabilities", "tta_hflip"))


def level(run: RunRecord) -> str:
    level = get(run.intervals, "settings", "level")
    return f"{level:.0%}" if is_number(level) else "95%"


def class_order(run: RunRecord, mapping: dict[str, Any]) -> list[str]:
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


def result_plot(run: RunRecord, kind: str, default: str) -> Path:
    """Training's plot, or the one cxrdist.evaluate wrote beside its JSON (``eval_test_roc.png``)."""
    if run.metrics_file == run.run_dir / TEST_METRICS_FILE:
        return run.run_dir / default
    return run.metrics_file.with_name(f"{run.metrics_file.stem}_{kind}.png")
