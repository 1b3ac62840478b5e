"""cxrdist.report: the self-contained run page, read back as HTML and, once, in a real headless chromium.

Run folders are built here the way a run writes them: test_metrics.json from the real metric functions
(summarize, bootstrap_intervals, calibration_report, operating_points) written with atomic_write_json,
the real config.toml layout, a manifest, metrics.jsonl rows and a Grad-CAM summary.
"""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import re
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from cxrdist import outputs
from cxrdist.artifacts import model_meta, provenance
from cxrdist.calibration import fit_temperature
from cxrdist.config import load_config
from cxrdist.evaluate import Options, SplitScores, full_metrics, probabilities, split_metrics
from cxrdist.report import fmt, fmt_interval, main, read_run, render_report, write_report
from cxrdist.train import config_toml
from cxrdist.uncertainty import bootstrap_intervals
from shard_tools.cli import run_main
from shard_tools.errors import EXIT_OK, EXIT_USAGE
from shard_tools.files import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
HOSTILE = "<script>x</script>"
COMMIT = "0123456789abcdef0123456789abcdef01234567-dirty"


# ------------------------------------------------------------------------------------- run folders


def fake_outputs(k: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of an over-confident, mostly right model, and labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    return 3 * (rng.normal(size=(n, k)) + 1.2 * np.eye(k)[labels]), labels


def run_metrics(
    classes=CLASSES, n: int = 240, seed: int = 0, *, extras: bool = True, tta: bool = False, subgroups=None
) -> dict:
    """test_metrics.json as outputs.finish_outputs writes it: `evaluate.full_metrics` of fake scores, with a
    temperature fitted on a fake validation split (intervals, calibration, operating points, and with
    `tta` / `subgroups` their parts), plus best_epoch, split and provenance. `extras=False`: an older
    run's plain `split_metrics`. `subgroups`: sample index -> subgroup name."""
    k = len(classes)
    logits, labels = fake_outputs(k, n, seed)
    keys = tuple(f"s{i:05d}" for i in range(n))
    flipped = logits + np.random.default_rng(seed + 2).normal(0, 1.0, logits.shape) if tta else None
    scores = SplitScores(keys, labels, logits.astype(np.float32), flipped)
    if extras:
        val_logits, val_labels = fake_outputs(k, n, seed + 1)
        groups = None if subgroups is None else {keys[i]: name for i, name in subgroups.items()}
        options = Options(
            temperature=fit_temperature(val_logits, val_labels), tta=tta, resamples=200, subgroups=groups
        )
        metrics = full_metrics(scores, classes, options)
    else:
        metrics = split_metrics(scores, classes, probabilities(scores))
    metrics |= {"best_epoch": 3, "split": "test"}
    metrics["provenance"] = {"cxrdist_version": "0.1.0", "git_commit": COMMIT, "torch_version": "2"}
    return json.loads(json.dumps(metrics))  # as the report reads it back


def manifest(classes=CLASSES, source: str = "/data/COVID-19_Radiography_Dataset") -> dict:
    counts = {"train": 70, "val": 15, "test": 15}
    splits = {
        s: {
            "count": n * len(classes),
            "class_counts": {c: n + i for i, c in enumerate(classes)},
            "shards": [],
        }
        for s, n in counts.items()
    }
    for s in splits:  # class_counts above are n + i: keep count equal to their sum
        splits[s]["count"] = sum(splits[s]["class_counts"].values())
    return {
        "format_version": 1,
        "classes": list(classes),
        "image_size": 224,
        "seed": 0,
        "split_fractions": {"train": 0.7, "val": 0.15, "test": 0.15},
        "source": source,
        "tool_version": "0.1.0",
        "command": ["python", "-m", "shard_tools.pack", source, "out dir", "--size", "224"],
        "splits": splits,
        "skipped": [{"path": "x.gif", "reason": "not an image"}],
        "duplicates": [{"pixel_sha256": "0" * 64, "paths": ["a.png", "b.png"], "split": "train"}],
    }


def config_text(model: str = "resnet18", extra_comment: str = "") -> str:
    """config.toml as training writes it (`cxrdist.train.config_toml`): provenance comments, then the
    resolved demo recipe; `extra_comment` goes after the header's first line."""
    text = config_toml(load_config(REPO / "recipes" / "demo.toml", [f"model.name={model}"]), 2, "bf16")
    first, rest = text.split("\n", 1)
    return f"{first}\n{extra_comment}{rest}"


def write_model_meta(root: Path, classes, seed: int = 0, n: int = 240) -> None:
    """best/meta.json as training writes it: `cxrdist.artifacts.model_meta`, then `cxrdist.outputs.calibrate`
    on the fake validation scores that `run_metrics` fits its temperature on (so the temperatures agree)."""
    training = {"epoch": 3, "ema": False, "best_metric": "accuracy", "val_metrics": {"accuracy": 0.8}}
    (root / "best").mkdir(parents=True, exist_ok=True)
    meta = model_meta("resnet18", 1, tuple(classes), 224, training)
    atomic_write_json(root / "best" / "meta.json", meta)
    run = SimpleNamespace(run_dir=root, accelerator=SimpleNamespace(is_main_process=True))
    logits, labels = fake_outputs(len(classes), n, seed + 1)
    val = SplitScores(tuple(map(str, range(n))), labels, logits.astype(np.float32))
    with mock.patch.object(outputs, "score_split", lambda run, split: val):
        outputs.calibrate(run)


def metrics_rows(classes=CLASSES, epochs: int = 6) -> list[dict]:
    rows = []
    for epoch in range(1, epochs + 1):
        val = run_metrics(classes, n=60, seed=epoch, extras=False)
        val["loss"] = 1.4 / epoch
        rows.append(
            {
                "epoch": epoch,
                "train_loss": 1.5 / epoch,
                "images_per_s": 400.0 + epoch,
                "epoch_seconds": 30.0,
                "lr": 2e-3 / epoch,
                "val": val,
                "best": epoch == 3,
            }
        )
    return rows


def pil_png(path: Path, colour: tuple[int, int, int], size=(48, 32)) -> None:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


PNGS = (
    "confusion_test.png",
    "curves.png",
    "roc_test.png",
    "reliability_test.png",
    "gradcam/gradcam_grid_test.png",
)

AUDIT_VARIANTS = (
    ("intact", "as they are", "the test images unchanged"),
    ("lungs_hidden", "lungs hidden", "both lung fields flat grey"),
    ("lungs_only", "only the lungs visible", "everything but the lungs flat grey"),
    ("border_only", "only the border visible", "only a 12% frame left"),
)


def occluded_metrics(classes, signal: float, n: int = 240, seed: int = 0) -> dict:
    """One variant's M as audit.json holds it (contracts): `split_metrics` plus `bootstrap_intervals`
    of fake scores whose class signal is `signal` (1.2: as intact; 0: chance)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(classes), n)
    logits = 3 * (rng.normal(size=(n, len(classes))) + signal * np.eye(len(classes))[labels])
    scores = SplitScores(tuple(map(str, range(n))), labels, logits.astype(np.float32))
    probs = probabilities(scores)
    metrics = split_metrics(scores, classes, probs)
    metrics["intervals"] = bootstrap_intervals(probs, labels, classes, resamples=200, seed=0)
    return json.loads(json.dumps(metrics))


def audit_report(classes=CLASSES, *, flagged: bool = True, sources: dict | None = None) -> dict:
    """audit.json following /work/notes/contracts.md exactly, written by hand until cxrdist.audit's own
    output is used here: `flagged` keeps a class signal with the lungs hidden (a shortcut), otherwise
    the occluded variants sit at chance. `sources`: per-source names -> signal."""
    signals = {"intact": 1.2, "lungs_hidden": 0.8 if flagged else 0.0, "lungs_only": 1.0}
    signals["border_only"] = 0.9 if flagged else 0.0
    k = len(classes)
    line = (
        "Shortcut suspected: with the lungs hidden the model still tells the classes apart."
        if flagged
        else "No shortcut found: with the lungs hidden the model is at chance."
    )
    return {
        "split": "test",
        "num_samples": 240,
        "classes": list(classes),
        "classes_scored": list(classes),
        "mask_source": "template",
        "mask_note": "The shards hold no lung masks: cxrdist.lungs' template (two ellipses) stands in.",
        "chance": {"balanced_accuracy": 1 / k, "accuracy": 0.27},
        "margin": 0.10,
        "intervals": {
            "method": "stratified percentile bootstrap",
            "resamples": 200,
            "seed": 0,
            "level": 0.95,
        },
        "variants": {
            key: {
                "title": title,
                "description": text,
                "metrics": occluded_metrics(classes, signals[key], seed=i),
            }
            for i, (key, title, text) in enumerate(AUDIT_VARIANTS)
        },
        "verdict": {
            "shortcut_suspected": flagged,
            "line": line,
            "reasons": ["balanced accuracy with the lungs hidden: its interval is above chance + 0.10"]
            if flagged
            else [],
        },
        "visible_region": {
            "fraction": 0.64,
            "note": "The last pool keeps the top-left 8x8 of an 11x11 map.",
            "image": "audit_visible.png",
        },
        "gradcam": {"inside_share_mean": 0.7, "region": "template"},
        "per_source": (
            {name: occluded_metrics(classes, signal, n=60, seed=9) for name, signal in sources.items()}
            if sources
            else None
        ),
        "provenance": {"cxrdist_version": "0.1.0"},
    }


def add_audit(run: Path, report: dict) -> None:
    atomic_write_json(run / "audit.json", report)
    pil_png(run / "audit_visible.png", (120, 120, 120), size=(64, 64))
    pil_png(run / "audit_examples.png", (90, 90, 90), size=(256, 64))


def make_run(root: Path, classes=CLASSES, *, metrics: dict | None = None, real_plots: bool = False) -> Path:
    """A finished run's folder. `real_plots`: draw the PNGs with cxrdist.plots and Grad-CAM overlays
    (about 3 s); otherwise small solid-colour PNGs."""
    root.mkdir(parents=True, exist_ok=True)
    metrics = metrics or run_metrics(classes)
    atomic_write_json(root / "test_metrics.json", metrics)
    if (metrics.get("calibration") or {}).get("temperature") is not None:
        write_model_meta(root, classes)
    atomic_write_json(root / "manifest.json", manifest(classes))
    atomic_write_text(root / "config.toml", config_text())
    rows = metrics_rows(classes)
    atomic_write_text(root / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    per_class = {
        c: {"images": 6, "mean_outside_share": 0.1 + 0.05 * i, "accuracy": 5 / 6}
        for i, c in enumerate(classes)
    }
    shards = {
        "grid": "/elsewhere/gradcam_grid_test.png",
        "split": "test",
        "lung_box": [0.12, 0.08, 0.88, 0.92],
    }
    atomic_write_json(
        root / "gradcam" / "explain_summary.json",
        {"model": str(root), "shards": shards | {"per_class": per_class}},
    )
    if real_plots:
        draw_real_pngs(root, classes, metrics, rows)
    else:
        for i, name in enumerate(PNGS):
            pil_png(root / name, (40 * i, 200 - 30 * i, 90))
    return root


def draw_real_pngs(root: Path, classes, metrics: dict, rows: list[dict]) -> None:
    from cxrdist.explain import grid_image, overlay
    from cxrdist.operating_points import roc_curves
    from cxrdist.plots import plot_confusion, plot_curves, plot_reliability, plot_roc
    from shard_tools.synth import draw

    logits, labels = fake_outputs(len(classes), metrics["num_samples"], 0)
    keys = tuple(map(str, range(len(labels))))
    probs = probabilities(SplitScores(keys, labels, logits), metrics["calibration"]["temperature"])
    plot_confusion(metrics["confusion_matrix"], classes, root / "confusion_test.png", "test, best epoch 3")
    plot_curves(rows, root / "curves.png")
    plot_roc(roc_curves(probs, labels, classes), root / "roc_test.png")
    cal = metrics["calibration"]
    plot_reliability(cal["before"]["bins"], root / "reliability_test.png", bins_after=cal["after"]["bins"])
    size, per_class = 128, 4
    grid_rows = []
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for r, name in enumerate(classes):
        tiles = []
        for j in range(per_class):
            gray = draw(name if name in CLASSES else "Normal", size, rng, rng)
            cy, cx = rng.uniform(0.2, 0.8, 2)
            cam = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
            tiles.append((overlay(gray, cam / cam.max()), classes[(r + (j == 3)) % len(classes)]))
        grid_rows.append((name, tiles))
    buf = io.BytesIO()
    grid_image(grid_rows).save(buf, format="PNG")
    (root / "gradcam" / "gradcam_grid_test.png").write_bytes(buf.getvalue())


# ------------------------------------------------------------------------------------ reading HTML


VOID = {"meta", "link", "img", "br", "hr", "input", "source", "col", "wbr"}
# Elements whose end tag HTML lets you leave out; the page always closes them, so they are checked too.


class Page(HTMLParser):
    """Collects every tag's attributes and checks that elements nest and close properly."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.feed(text)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed {self.stack}")

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for t, attrs in self.tags if t == tag]


def row(page: str, attr: str, value: str) -> str:
    """The HTML of the first <tr> with `attr`="value" (value as it appears in the page, escaped)."""
    m = re.search(rf'<tr[^>]*\b{attr}="{re.escape(value)}"[^>]*>(.*?)</tr>', page, re.S)
    assert m, f"no row {attr}={value!r}"
    return m.group(1)


def section(page: str, ident: str) -> str:
    m = re.search(rf'<section id="{ident}">(.*?)</section>', page, re.S)
    assert m, f"no section {ident}"
    return m.group(1)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("report") / "run")


# -------------------------------------------------------------------------------------- unit tests


def test_full_page_shows_every_section_with_the_runs_numbers(full_run):
    path = write_report(full_run)
    assert path == full_run / "report.html"
    page = path.read_text()
    parsed = Page(page)
    assert parsed.errors == []
    assert [s["id"] for s in parsed.all("section")] == [
        "summary", "audit", "data", "training", "results", "roc", "calibration", "gradcam", "model-card",
        "recipe",
    ]  # fmt: skip
    m = json.loads((full_run / "test_metrics.json").read_text())
    ci = m["intervals"]

    # Summary: headline values and intervals as the page formats them.
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1"):
        cells = row(page, "data-metric", key)
        assert f'<td class="num value">{fmt(m[key])}</td>' in cells
        assert fmt_interval(ci[key]) in cells and fmt_interval(ci[key]).startswith("[0.")
    assert fmt(m["macro"]["roc_auc"]) in row(page, "data-metric", "macro_roc_auc")

    # Per class: every metric with its interval, in manifest order, then the averages.
    results = section(page, "results")
    assert [results.index(f'data-class="{c}"') for c in CLASSES] == sorted(
        results.index(f'data-class="{c}"') for c in CLASSES
    )
    for name in CLASSES:
        cells = row(results, "data-class", name)
        for key in ("precision", "recall", "specificity", "f1", "roc_auc"):
            value = m["per_class"][name][key]
            assert f'<span class="v">{fmt(value)}</span><span class="ci">' in cells
            assert fmt_interval(ci["per_class"][name][key]) in cells
        assert f'<td class="num">{m["per_class"][name]["support"]}</td>' in cells
    assert fmt(m["weighted"]["f1"]) in row(results, "data-avg", "weighted")

    # Operating points: one row per class and target, threshold and intervals.
    for name in CLASSES:
        points = m["operating_points"][name]["points"]
        cells = re.findall(rf'<tr data-class="{name}" data-target="[^"]*">(.*?)</tr>', page, re.S)
        assert len(cells) == len(points) == 3
        assert f"AUC {fmt(m['operating_points'][name]['auc'])}; " in cells[0]
        for point, html in zip(points, cells, strict=True):
            assert point["target"].replace(">=", " ≥ ") in html
            assert 1e-3 <= point["threshold"] < 1 and f'<td class="num">{point["threshold"]:.4f}</td>' in html
            for key in ("sensitivity", "specificity"):
                assert fmt(point[key]) in html and fmt_interval(point[f"{key}_interval"]) in html

    # Calibration before/after and the temperature.
    cal = m["calibration"]
    for key in ("ece", "brier", "nll"):
        cells = row(page, "data-metric", key)
        assert fmt(cal["before"][key]) in cells and fmt(cal["after"][key]) in cells
    assert f'<span id="temperature">{cal["temperature"]:.3f}</span>, fitted on the val split' in page

    # Data: counts per class and split from the manifest, the pack command, quoted as a shell would.
    data = section(page, "data")
    mf = json.loads((full_run / "manifest.json").read_text())
    cells = row(data, "data-class", "Viral Pneumonia")
    counts = [mf["splits"][s]["class_counts"]["Viral Pneumonia"] for s in ("train", "val", "test")]
    assert re.findall(r'class="num">([\d,]+)<', cells) == [str(c) for c in counts] + [str(sum(counts))]
    # The pack command as shell words, each option with its value in one unbreakable span.
    words = re.findall(r'<span class="cmd">([^<]*)</span>', data)
    source, out = "/data/COVID-19_Radiography_Dataset", "&#39;out dir&#39;"
    assert words == ["python", "-m shard_tools.pack", source, out, "--size 224"]
    assert "groups (patients)" not in data and "none recorded" in data

    assert "; computed in bf16 autocast." in section(page, "summary")  # config.toml's header

    # Training, Grad-CAM, model card, recipe.
    training = section(page, "training")
    assert "best epoch (3)" in training and "last epoch (6)" in training and "6 epochs in 3.0 min" in training
    gradcam = section(page, "gradcam")
    assert re.findall(r"(\d+\.\d%)</td>", row(gradcam, "data-class", "Normal")) == ["20.0%", "83.3%"]
    assert "12% to 88% of the width" in gradcam and "no proof of a shortcut" in gradcam
    card = section(page, "model-card")
    assert "Not for diagnosis" in card and "132665–132676" in card and "104319" in card
    assert "paediatric" in card and "DeGrave" in card
    assert f"accuracy {fmt(m['accuracy'])} {fmt_interval(ci['accuracy'])}" in card
    assert "resnet18 trained from scratch; 6 of 6 epochs, best epoch 3" in card
    assert "2 process(es); mixed precision bf16; cxrdist 0.1.0, commit " + provenance()["git_commit"] in card
    assert "COVID 100, Lung_Opacity 103, Normal 106, Viral Pneumonia 109 images" in card
    recipe = section(page, "recipe")
    assert "# world_size: 2" in recipe and "name = &#34;resnet18&#34;" in recipe


def test_page_is_self_contained_and_images_are_the_files(full_run):
    page = render_report(read_run(full_run))
    parsed = Page(page)
    imgs = parsed.all("img")
    assert len(imgs) == len(PNGS)
    for attrs in imgs:
        assert attrs["src"].startswith("data:image/png;base64,")
        data = base64.b64decode(attrs["src"].split(",", 1)[1])
        assert data == (full_run / attrs["data-file"]).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            assert (int(attrs["width"]), int(attrs["height"])) == im.size
    assert sorted(a["data-file"] for a in imgs) == sorted(PNGS)
    # Nothing to fetch: no script, no stylesheet link, no remote src; the only links are DOI citations
    # and in-page anchors, and the favicon is an empty data: URI (a browser would ask for /favicon.ico).
    assert not parsed.all("script") and "<script" not in page
    for tag, attrs in parsed.tags:
        for name in ("src", "href"):
            url = attrs.get(name)
            if url is not None:
                assert url.startswith(("data:", "#", "https://doi.org/")), (tag, url)
    assert [a["href"] for a in parsed.all("link")] == ["data:,"]
    assert len(parsed.all("style")) == 1


def test_text_from_files_is_escaped(tmp_path):
    classes = ("COVID", HOSTILE, "Normal & <b>")
    run = make_run(tmp_path / "run", classes)
    m = manifest(classes, source='/data/"quoted" <img src=x onerror=alert(1)>')
    atomic_write_json(run / "manifest.json", m)
    atomic_write_text(run / "config.toml", config_text(extra_comment="# note: </pre><script>y</script>\n"))
    page = write_report(run).read_text()
    assert "<script" not in page and "<b>" not in page and "<img src=x" not in page
    assert page.count("&lt;script&gt;x&lt;/script&gt;") >= 6  # per-class, data, op. points, Grad-CAM, card
    assert 'data-class="&lt;script&gt;x&lt;/script&gt;"' in page
    assert "Normal &amp; &lt;b&gt;" in page
    assert "&lt;/pre&gt;&lt;script&gt;y&lt;/script&gt;" in section(page, "recipe")
    assert "&#34;quoted&#34; &lt;img src=x onerror=alert(1)&gt;" in page
    assert Page(page).errors == []  # the hostile names did not break the markup

    # The same names through audit.json: table headers, confusion matrices, the verdict and the card.
    audit = audit_report(classes, sources={"<img src=y onerror=alert(2)>": 1.0})
    audit["verdict"]["line"] = "Shortcut <script>z</script> suspected"
    add_audit(run, audit)
    page = write_report(run).read_text()
    assert "<script" not in page and "<img src=y" not in page
    audit_html = section(page, "audit")
    assert audit_html.count("&lt;script&gt;x&lt;/script&gt;") >= 5  # recall header and four matrices
    assert page.count("Shortcut &lt;script&gt;z&lt;/script&gt; suspected") == 3  # first screen, section, card
    assert 'data-source="&lt;img src=y onerror=alert(2)&gt;"' in audit_html
    assert Page(page).errors == []


def test_missing_pieces_are_one_muted_line_never_a_broken_image(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    metrics = run_metrics(extras=False)  # an older run: no intervals, calibration or operating points
    atomic_write_json(run / "test_metrics.json", metrics)
    page = write_report(run).read_text()
    parsed = Page(page)
    assert parsed.errors == [] and parsed.all("img") == []
    assert [s["id"] for s in parsed.all("section")] == ["summary", "audit", "results", "model-card"]
    assert "<code>confusion_test.png</code>: not written by this run" in page
    assert "Not in this run: Data, Training, ROC curves and operating points, Calibration, Grad-CAM" in page
    assert "No intervals in the metrics file" in page
    assert f'<td class="num value">{fmt(metrics["accuracy"])}</td><td class="num interval">–</td>' in page
    assert "the images it used are unknown" in page  # the model card says what it does not know

    # A plot is present but damaged (cut short), another is missing: muted lines, the rest shown.
    full = make_run(tmp_path / "full")
    roc = (full / "roc_test.png").read_bytes()
    (full / "roc_test.png").write_bytes(roc[: len(roc) // 2])
    (full / "curves.png").unlink()
    page = write_report(full).read_text()
    assert "<code>roc_test.png</code>: not a complete PNG file" in page
    assert "<code>curves.png</code>: not written by this run" in page
    assert len(Page(page).all("img")) == len(PNGS) - 2

    # Unreadable optional files are named, and their part is left out; the page is still written.
    (full / "manifest.json").write_text("{not json")
    (full / "metrics.jsonl").write_text('{"epoch": 1}\n{"epo')
    page = write_report(full).read_text()
    assert "<code>manifest.json</code> could not be read" in page
    assert "<code>metrics.jsonl</code> could not be read" in page
    assert 'id="data"' not in page


def test_optional_tta_subgroups_and_groups(tmp_path):
    names = {i: "hospital <A>" if i % 5 else "hospital B" for i in range(240)}
    metrics = run_metrics(tta=True, subgroups=names)
    metrics["subgroups"]["empty"] = None  # a damaged entry leaves its row blank, nothing else
    run = make_run(tmp_path / "run", metrics=metrics)
    m = manifest()
    m["groups"] = {
        "file": "/data/patients.csv",
        "sha256": "0" * 64,
        "ungrouped": "own-group",
        "own_groups": 3,
    }
    for split, n in (("train", 40), ("val", 9), ("test", 8)):
        m["splits"][split]["groups"] = [f"p{i}" for i in range(n)]
    atomic_write_json(run / "manifest.json", m)
    page = write_report(run).read_text()
    assert Page(page).errors == []

    tta, plain = section(page, "tta"), metrics["without_tta"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        cells = row(tta, "data-metric", key)
        assert re.findall(r'<span class="v">([^<]*)</span>', cells) == [fmt(metrics[key]), fmt(plain[key])]
        assert (
            fmt_interval(metrics["intervals"][key]) in cells
            and fmt_interval(plain["intervals"][key]) in cells
        )
        assert f'<td class="num">{metrics[key] - plain[key]:+.4f}</td>' in cells
    auc = row(tta, "data-metric", "macro_roc_auc")
    assert fmt(metrics["macro"]["roc_auc"]) in auc and fmt(plain["macro_roc_auc"]) in auc
    assert fmt(plain["loss"]) in row(tta, "data-metric", "loss")
    assert 'data-metric="weighted_f1"' not in tta  # not measured without TTA
    assert "averaged with the mirrored image" in section(page, "summary")

    subgroups = section(page, "subgroups")
    assert "hospital <A>" not in subgroups
    for name, escaped in (("hospital <A>", "hospital &lt;A&gt;"), ("hospital B", "hospital B")):
        sub, cells = metrics["subgroups"][name], row(subgroups, "data-subgroup", escaped)
        assert f'<td class="num">{sub["num_samples"]}</td>' in cells
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1"):
            interval = fmt_interval(sub["intervals"][key])
            assert f'<span class="v">{fmt(sub[key])}</span><span class="ci">{interval}<' in cells
    assert [sub["num_samples"] for sub in list(metrics["subgroups"].values())[:2]] == [192, 48]
    assert row(subgroups, "data-subgroup", "empty").count("–") == 6  # images and five metrics

    data = section(page, "data")
    assert re.findall(r'class="num">(\d+)<', row(data, "data-row", "groups")) == ["40", "9", "8", "57"]
    assert "/data/patients.csv" in data and "3 images not in the file formed a group each" in data


def test_macro_average_says_which_classes_it_leaves_out(tmp_path):
    metrics = run_metrics() | {"macro_over": ["COVID", "Normal", "Viral Pneumonia"]}
    page = write_report(make_run(tmp_path / "run", metrics=metrics)).read_text()
    note = re.search(r'<span id="macro-left-out">(.*?)</span>', section(page, "results"))
    assert note and note.group(1).startswith("The macro average leaves out Lung_Opacity: no test image of it")
    full = write_report(make_run(tmp_path / "full")).read_text()
    assert "macro-left-out" not in full


def test_operating_points_without_threshold_or_curve(tmp_path):
    metrics = run_metrics()
    points = metrics["operating_points"]
    points["Normal"] = None  # absent from the test split, or alone in it
    covid = points["COVID"]["points"]
    covid[0]["threshold"], covid[1]["threshold"] = None, 3.2e-06
    run = make_run(tmp_path / "run", metrics=metrics)
    roc = section(write_report(run).read_text(), "roc")
    assert "no curve: the class is absent from the test split, or alone in it" in row(
        roc, "data-class", "Normal"
    )
    covid_rows = re.findall(r'<tr data-class="COVID" data-target="[^"]*">(.*?)</tr>', roc, re.S)
    assert '<td class="num">none</td>' in covid_rows[0] and '<td class="num">3.2e-06</td>' in covid_rows[1]
    assert "<em>none</em>: only calling nothing positive meets the target" in roc


def test_tta_flag_alone_is_one_sentence(tmp_path):
    metrics = run_metrics(extras=False) | {"probabilities": {"tta_hflip": True}}
    run = make_run(tmp_path / "run", metrics=metrics)
    tta = section(write_report(run).read_text(), "tta")
    assert "mirror" in tta and "<table" not in tta


def test_cli_regenerates_and_rejects_what_is_not_a_finished_run(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    capsys.readouterr()  # calibrate's line while the run folder was made
    (run / "report.html").write_text("old")
    assert run_main(main, [str(run)]) == EXIT_OK
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    assert (run / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary file left

    cases = {
        tmp_path / "absent": "no such folder",
        run / "config.toml": "is a file",
        tmp_path / "empty": "is not a run directory: no test_metrics.json, config.toml or manifest.json",
        tmp_path / "unfinished": "no test_metrics.json: has the run finished?",
        tmp_path / "broken": "test_metrics.json: cannot be read as JSON",
    }
    (tmp_path / "empty").mkdir()
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.toml").write_text(config_text())
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "test_metrics.json").write_text('{"accuracy": 0.')
    for folder, message in cases.items():
        assert run_main(main, [str(folder)]) == EXIT_USAGE
        err = capsys.readouterr().err.strip()
        assert message in err and str(folder) in err and "\n" not in err, err
        assert not (folder / "report.html").exists() or folder == run


# ----------------------------------------------------------------------- the audit and the first screen


def test_audit_section_shows_variants_with_intervals_where_images_go_and_the_verdict(tmp_path):
    run = make_run(tmp_path / "run")
    audit = audit_report(sources={"https://a.example/<x>": 1.0, "site B": 0.2})
    add_audit(run, audit)
    page = write_report(run).read_text()
    parsed = Page(page)
    assert parsed.errors == []
    ids = [s["id"] for s in parsed.all("section")]
    assert ids[:3] == ["summary", "audit", "data"]  # near the top
    line = audit["verdict"]["line"]
    header = page[: page.index("<nav>")]  # the first screen: the verdict a reader cannot miss
    assert 'class="verdict flagged" id="verdict"' in header and line in header

    section_html = section(page, "audit")
    assert f'<p class="verdict flagged" id="audit-verdict">{line}</p>' in section_html
    assert audit["verdict"]["reasons"][0].replace("+", "+") in section_html
    for key, title, _ in AUDIT_VARIANTS:
        m = audit["variants"][key]["metrics"]
        cells = row(section_html, "data-variant", key)
        assert title in cells
        values = re.findall(r'<span class="v">([^<]*)</span>', cells)
        recalls = [fmt(m["per_class"][c]["recall"]) for c in CLASSES]
        assert values == [
            fmt(m["accuracy"]),
            fmt(m["balanced_accuracy"]),
            fmt(m["macro"]["roc_auc"]),
            *recalls,
        ]
        for interval in (m["intervals"]["balanced_accuracy"], m["intervals"]["per_class"]["COVID"]["recall"]):
            assert fmt_interval(interval) in cells
        # Shaded: balanced accuracy above chance + margin without the lungs (not for the intact images).
        flagged = m["intervals"]["balanced_accuracy"][0] > 0.25 + 0.10
        assert ('class="num flag"' in cells) == (flagged and key in ("lungs_hidden", "border_only"))
    assert 'class="num flag"' in row(section_html, "data-variant", "lungs_hidden")
    assert re.findall(r'<td class="num">([^<]*)</td>', row(section_html, "data-variant", "chance"))[:3] == [
        "0.2700", "0.2500", "0.5000"
    ]  # fmt: skip

    # Where the occluded images go: one small confusion matrix per variant, counts as in audit.json.
    matrices = re.findall(r'<table class="cm" data-variant="([^"]+)">(.*?)</table>', section_html, re.S)
    assert [key for key, _ in matrices] == [key for key, *_ in AUDIT_VARIANTS]
    for key, html in matrices:
        counts = [int(n) for n in re.findall(r'<td class="num"[^>]*>(\d+)</td>', html)]
        assert counts == [n for r in audit["variants"][key]["metrics"]["confusion_matrix"] for n in r]

    # The visible region, the examples, the Grad-CAM share beside, the mask note and the sources.
    files = [a["data-file"] for a in parsed.all("img")]
    assert "audit_visible.png" in files and "audit_examples.png" in files
    assert "depends on 64% of the image" in section_html
    assert "<strong>70.0%</strong> of the heat-map mass lies inside the lungs" in section_html
    assert "template (two ellipses) stands in" in section_html
    hostile = row(section_html, "data-source", "https://a.example/&lt;x&gt;")
    m = audit["per_source"]["https://a.example/<x>"]
    assert f'<span class="v">{fmt(m["balanced_accuracy"])}</span>' in hostile and ">60<" in hostile

    # The model card cites the measured numbers, not only generic text.
    card = section(page, "model-card")
    hidden = audit["variants"]["lungs_hidden"]["metrics"]
    interval = fmt_interval(hidden["intervals"]["balanced_accuracy"])
    assert f"lungs hidden: balanced accuracy {fmt(hidden['balanced_accuracy'])} {interval}" in card
    assert line in card


def test_clean_audit_reads_clear_and_a_missing_audit_says_how_to_run_it(tmp_path):
    run = make_run(tmp_path / "run")
    page = write_report(run).read_text()
    assert 'class="verdict unknown" id="verdict"' in page and "Not tested" in page
    audit_html = section(page, "audit")
    assert f"<code>python -m cxrdist.audit {run} --shards SHARDS</code>" in audit_html
    assert "<table" not in audit_html
    assert "Not measured: the shortcut audit was not run" in section(page, "model-card")

    add_audit(run, audit_report(flagged=False))
    page = write_report(run).read_text()
    assert 'class="verdict clear" id="verdict"' in page and "No shortcut found" in page
    assert 'class="num flag"' not in section(page, "audit")

    (run / "audit.json").write_text('{"split": ')  # damaged: named, and the section says not run
    page = write_report(run).read_text()
    assert "<code>audit.json</code> could not be read" in page and "Not tested" in page


@pytest.mark.parametrize("signal_without_lungs", [0.0, 1.0])
def test_the_audit_that_cxrdist_audit_computes_reads_as_its_verdict(tmp_path, signal_without_lungs):
    from cxrdist.audit import VARIANTS, AuditOptions, audit_report

    n, k = 240, len(CLASSES)
    rng = np.random.default_rng(3)
    labels = rng.integers(0, k, n)
    scores = {}
    for name in VARIANTS:
        signal = 1.2 if name in ("intact", "lungs_only") else signal_without_lungs
        logits = 3 * (rng.normal(size=(n, k)) + signal * np.eye(k)[labels])
        scores[name] = SplitScores(tuple(map(str, range(n))), labels, logits.astype(np.float32))
    audit = audit_report(scores, CLASSES, AuditOptions(resamples=200), "template")
    audit |= {"split": "test", "visible_region": {"fraction": 0.6, "note": "", "image": "audit_visible.png"}}
    audit |= {"examples_image": "audit_examples.png", "gradcam": None, "per_source": None, "provenance": {}}
    run = make_run(tmp_path / "run")
    add_audit(run, json.loads(json.dumps(audit)))
    page = write_report(run).read_text()
    suspected = audit["verdict"]["shortcut_suspected"]
    assert suspected == (signal_without_lungs > 0)
    header = page[: page.index("<nav>")]
    assert f'class="verdict {"flagged" if suspected else "clear"}" id="verdict"' in header
    assert audit["verdict"]["line"].replace("'", "&#39;") in header
    audit_html = section(page, "audit")
    assert re.findall(r'<tr data-variant="(\w+)">', audit_html) == [*VARIANTS, "chance"]
    hidden = audit["variants"]["lungs_hidden"]["metrics"]
    assert fmt(hidden["balanced_accuracy"]) in row(audit_html, "data-variant", "lungs_hidden")


@pytest.mark.parametrize(
    ("source", "kind", "title", "says", "never"),
    [
        (
            "/work/demo_out/synthetic",
            "synthetic",
            "resnet18 trained on synthetic radiographs",
            "No patient's image is in them",
            ("COVID-19 Radiography Database", "paediatric", "Kaggle"),
        ),
        (
            "/data/COVID-19_Radiography_Dataset.zip",
            "database",
            "resnet18 trained on the COVID-19 Radiography Database",
            "(Kaggle), packed from <code>/data/COVID-19_Radiography_Dataset.zip</code>",
            ("shard_tools.synth",),
        ),
        (
            "/data/hospital_a",
            "folder",
            "resnet18 trained on images from hospital_a",
            "packed from <code>/data/hospital_a</code>",
            ("COVID-19 Radiography Database", "paediatric", "shard_tools.synth"),
        ),
    ],
)
def test_first_screen_and_model_card_say_what_data_they_show(tmp_path, source, kind, title, says, never):
    run = make_run(tmp_path / "run")
    atomic_write_json(run / "manifest.json", manifest(source=source))
    page = write_report(run).read_text()
    header = page[: page.index("<nav>")]
    assert f"<title>{title}</title>" in page and f"<h1>{title}</h1>" in header
    statement = re.search(r'id="data-statement" data-kind="(\w+)">(.*?)</div>', header, re.S)
    assert statement and statement.group(1) == kind and says in statement.group(2)
    assert "4 classes (COVID, Lung_Opacity, Normal, Viral Pneumonia); 240 test images" in statement.group(2)
    card = section(page, "model-card")
    for text in never:
        assert text not in card
    assert "cxrdist run report" not in page


def test_metrics_file_from_evaluate_puts_tta_results_on_the_page(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    evaluated = run_metrics(tta=True) | {
        "split": "test",
        "shards": "/data/shards",
        "model": str(run / "best"),
    }
    evaluated.pop("best_epoch")
    evaluated["precision"] = {"mixed_precision": "no", "model_tested_in": "bf16"}  # evaluate says which
    atomic_write_json(run / "best" / "eval_test.json", evaluated)
    pil_png(run / "best" / "eval_test_roc.png", (1, 2, 3))

    page = write_report(run).read_text()  # training's numbers, and a pointer to evaluate's
    assert 'id="tta"' not in page
    note = re.search(r'<p class="muted" data-evaluation="best/eval_test.json">(.*?)</p>', page, re.S)
    assert note and "with test-time augmentation" in note.group(1)
    assert "python -m cxrdist.report RUN_DIR --metrics best/eval_test.json" in note.group(1)

    assert run_main(main, [str(run), "--metrics", str(run / "best" / "eval_test.json")]) == EXIT_OK
    page = (run / "report.html").read_text()
    assert 'data-evaluation="' not in page
    assert "Test results from <code>best/eval_test.json</code>, written by" in section(page, "summary")
    assert "; computed in fp32." in section(page, "summary")
    cells = row(section(page, "tta"), "data-metric", "accuracy")
    assert fmt(evaluated["accuracy"]) in cells and fmt(evaluated["without_tta"]["accuracy"]) in cells
    assert fmt(evaluated["accuracy"]) in row(page, "data-metric", "accuracy")
    files = [a["data-file"] for a in Page(page).all("img")]
    assert "best/eval_test_roc.png" in files and "roc_test.png" not in files  # evaluate's own plots
    assert "<code>best/eval_test_confusion.png</code>: not written by this run" in page

    assert run_main(main, [str(run), "--metrics", str(tmp_path / "none.json")]) == EXIT_USAGE
    assert "none.json: no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_import_stays_light():
    """The report is written at the end of training and by hand: it must not pull in torch or matplotlib."""
    heavy = "('torch', 'matplotlib', 'numpy')"
    code = f"import sys, cxrdist.report; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------- real browser


CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,900",
)


def chromium_driver(profile: Path):
    """Debian's chromium through its chromedriver (never Selenium Manager, which would download one)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip(
            "needs Debian's chromium and chromedriver on PATH (apt-get install chromium chromium-driver); "
            f"found browser={browser}, chromedriver={driver}"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROME_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args):  # keep pytest's output clean; requests are recorded instead
        pass

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, list[str]]:
    """A real HTTP server on 127.0.0.1 serving `folder`, and the list of paths it was asked for."""
    requests: list[str] = []
    handler = type("Handler", (QuietHandler,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(folder))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, requests


def full_page_screenshot(driver, path: Path, width: int = 1200) -> None:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, height + 100)  # headless: the window is the page
    driver.save_screenshot(str(path))


@pytest.mark.slow
def test_report_renders_in_a_real_browser(tmp_path):
    metrics = run_metrics()
    run = make_run(tmp_path / "run", metrics=metrics, real_plots=True)
    atomic_write_json(run / "manifest.json", manifest(source="/work/demo_out/synthetic"))  # the demo's data
    audit = audit_report()
    add_audit(run, audit)
    write_report(run)
    server, requests = serve(run)
    driver = chromium_driver(tmp_path / "profile")
    try:
        driver.get(f"http://127.0.0.1:{server.server_port}/report.html")
        # The first screen, before any scrolling: what data the page shows, and the audit's verdict.
        first = driver.execute_script(
            "return ['data-statement', 'verdict'].map(id => {"
            " const e = document.getElementById(id), r = e.getBoundingClientRect();"
            " return [e.innerText, r.top, r.bottom, r.left, r.right]; })"
        )
        height = driver.execute_script("return window.innerHeight")
        (statement, *box), (verdict, *verdict_box) = first
        assert statement.startswith("Data: synthetic chest radiographs, drawn by shard_tools.synth")
        assert "not how a model does on real radiographs" in statement
        assert verdict == f"Does the model read the lungs? {audit['verdict']['line']} The audit."
        assert 0 <= box[0] < box[1] < verdict_box[1] < height  # both inside the first screen
        assert driver.title == "resnet18 trained on synthetic radiographs"
        driver.save_screenshot(str(tmp_path / "first_screen.png"))
        with Image.open(tmp_path / "first_screen.png") as shot:
            scale = shot.width / driver.execute_script("return window.innerWidth")
            x, y = int((box[2] + 6) * scale), int((box[0] + 4) * scale)
            assert shot.convert("RGB").getpixel((x, y)) == (0xFD, 0xF6, 0xE7)  # the synthetic box, drawn
        # The pack command breaks between arguments only: each option with its value on one line.
        lines = driver.execute_script(
            "return Array.from(document.querySelectorAll('#pack-command .cmd'))"
            ".map(e => e.getClientRects().length)"
        )
        assert lines and set(lines) == {1}
        # The Grad-CAM grid is shown at a readable size, not ~470 px for 16 images.
        grid_width = driver.execute_script(
            "return document.querySelector('img[data-file=\"gradcam/gradcam_grid_test.png\"]').width"
        )
        assert grid_width >= 850
        # Nothing wider than the window: no sideways scrolling at 1200 px.
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        images = driver.execute_script(
            "return Array.from(document.images)"
            ".map(i => [i.dataset.file, i.complete, i.naturalWidth, i.naturalHeight])"
        )
        assert sorted(f for f, *_ in images) == sorted([*PNGS, "audit_visible.png", "audit_examples.png"])
        for file, complete, width, height in images:
            with Image.open(run / file) as im:
                assert complete and (width, height) == im.size, file

        def text(selector: str) -> str:
            return driver.execute_script(f"return document.querySelector({selector!r}).textContent")

        assert text('#summary tr[data-metric="accuracy"] td.value') == fmt(metrics["accuracy"])
        assert text('#summary tr[data-metric="macro_f1"] td.interval') == fmt_interval(
            metrics["intervals"]["macro_f1"]
        )
        rows = driver.execute_script(
            "return Array.from(document.querySelectorAll('#per-class tbody tr[data-class]'))"
            ".map(r => [r.dataset.class, r.querySelector('th').textContent,"
            " Array.from(r.querySelectorAll('td .v')).map(v => v.textContent)])"
        )
        assert [r[0] for r in rows] == list(CLASSES) and [r[1] for r in rows] == list(CLASSES)
        for name, _, values in rows:
            keys = ("precision", "recall", "specificity", "f1", "roc_auc")
            assert values == [fmt(metrics["per_class"][name][k]) for k in keys]
        assert text("#temperature") == f"{metrics['calibration']['temperature']:.3f}"
        hidden = audit["variants"]["lungs_hidden"]["metrics"]["balanced_accuracy"]
        assert text('#audit-variants tr[data-variant="lungs_hidden"] td.flag .v') == fmt(hidden)
        # Numbers right-aligned, as the stylesheet says.
        align = driver.execute_script(
            "return getComputedStyle(document.querySelector('#per-class td.num')).textAlign"
        )
        assert align == "right"
        # The browser fetched the page and nothing else: images, style and icon are all inline.
        assert requests == ["/report.html"]

        full_page_screenshot(driver, tmp_path / "report.png")
        with Image.open(tmp_path / "report.png") as shot:
            assert shot.width >= 1000 and shot.height > 3000
        pdf = base64.b64decode(driver.print_page())  # "works printed": the print path renders
        assert pdf.startswith(b"%PDF") and pdf.count(b"/Type /Page") > 3
    finally:
        driver.quit()
        server.shutdown()
