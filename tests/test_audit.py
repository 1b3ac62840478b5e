"""The shortcut audit (cxrdist.audit): its numbers against a plain NumPy reference, masks from the shards or
the template, the verdict's logic (collapse included), bad input, and, in the slow lane, real trainings of
the study CNN on a planted-shortcut and a clean synthetic set, and 1 vs 2 ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrdist.audit import MARGIN, VARIANTS, AuditOptions, audit_report, main, score_variants, verdict
from cxrdist.augment import normalize_stats
from cxrdist.data import read_manifest
from cxrdist.evaluate import ScoringSettings
from cxrdist.lungs import BORDER_FRACTION, FILL, TEMPLATE_FIELDS
from shard_tools.cli import run_main

from launch import accelerate_launch, run_module
from shardgen import write_shards

SIZE = 24


class TinyModel(torch.nn.Module):
    """Logits from a 4x4 grid of mean gray levels: position and content both matter, as occlusion needs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.linear = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(x).flatten(1))


def numpy_lungs(h: int, w: int) -> np.ndarray:
    """The template's two ellipses, written again in NumPy from their documented parameters."""
    y = ((np.arange(h) + 0.5) / h)[:, None]
    x = ((np.arange(w) + 0.5) / w)[None, :]
    return np.any([((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1 for cx, cy, rx, ry in TEMPLATE_FIELDS], 0)


def numpy_reference(samples: dict, model: torch.nn.Module, masks: bool) -> dict[str, dict]:
    """Occlude with NumPy, score batch by batch in fp32, metrics computed directly. Keys sorted."""
    keys = sorted(k for k, s in samples.items() if s.split == "test")
    y = ((np.arange(SIZE) + 0.5) / SIZE)[:, None]
    x = ((np.arange(SIZE) + 0.5) / SIZE)[None, :]
    f = BORDER_FRACTION
    frame = ~((x > f) & (x < 1 - f) & (y > f) & (y < 1 - f))
    mean, std = normalize_stats(1)
    labels = np.array([samples[k].label for k in keys])
    out = {}
    for name in VARIANTS:
        logits = []
        for start in range(0, len(keys), 5):
            batch = []
            for k in keys[start : start + 5]:
                img = samples[k].pixels.copy()
                lungs = samples[k].mask if masks else numpy_lungs(SIZE, SIZE)
                hidden = {
                    "intact": np.zeros_like(lungs),
                    "lungs_hidden": lungs,
                    "lungs_only": ~lungs,
                    "border_only": ~frame,
                }[name]
                img[hidden] = FILL
                batch.append(img)
            z = (np.stack(batch)[:, None].astype(np.float32) / 255 - mean[0]) / std[0]
            with torch.no_grad():
                logits.append(model(torch.from_numpy(z)).numpy())
        logits = np.concatenate(logits)
        preds = logits.argmax(1)
        cm = np.zeros((4, 4), dtype=int)
        np.add.at(cm, (labels, preds), 1)
        recall = cm.diagonal() / cm.sum(1)
        out[name] = {
            "logits": logits,
            "accuracy": float((preds == labels).mean()),
            "balanced_accuracy": float(recall.mean()),
            "recall": recall.tolist(),
            "confusion_matrix": cm.tolist(),
        }
    return out


@pytest.mark.parametrize("masks", [False, True], ids=["template", "masks"])
def test_numbers_match_numpy_reference(tmp_path, masks):
    samples = write_shards(tmp_path, {"test": [7, 6, 9]}, image_size=SIZE, masks=masks, seed=1)
    manifest = read_manifest(str(tmp_path))
    model = TinyModel().eval()
    settings = ScoringSettings(device=torch.device("cpu"), batch_size=4, num_workers=0, in_chans=1)
    scores = score_variants(model, manifest, "test", settings)
    report = audit_report(
        scores, manifest.classes, AuditOptions(None, 50, 0), "shards" if masks else "template"
    )
    reference = numpy_reference(samples, model, masks)
    assert list(report["variants"]) == list(VARIANTS)
    for name, ref in reference.items():
        np.testing.assert_allclose(scores[name].logits, ref["logits"], rtol=1e-5, atol=1e-5)
        m = report["variants"][name]["metrics"]
        assert m["accuracy"] == pytest.approx(ref["accuracy"])
        assert m["balanced_accuracy"] == pytest.approx(ref["balanced_accuracy"])
        assert [m["per_class"][c]["recall"] for c in manifest.classes] == pytest.approx(ref["recall"])
        assert m["confusion_matrix"] == ref["confusion_matrix"]
        assert m["intervals"]["settings"]["resamples"] == 50
    # The occlusions differ, so the test can tell a variant from another.
    assert len({tuple(r["logits"].ravel().round(4)) for r in reference.values()}) == len(VARIANTS)
    assert report["mask_source"] == ("shards" if masks else "template")
    assert ("template" in report["mask_note"]) != masks
    assert report["chance"] == {"balanced_accuracy": 0.25, "accuracy": pytest.approx(6 / 22)}


def test_per_image_masks_are_not_the_template(tmp_path):
    """With masks in the shards, lungs_hidden differs from what the template would give."""
    samples = write_shards(tmp_path, {"test": [8]}, image_size=SIZE, masks=True, seed=2)
    model = TinyModel().eval()
    settings = ScoringSettings(device=torch.device("cpu"), batch_size=4, num_workers=0, in_chans=1)
    scores = score_variants(model, read_manifest(str(tmp_path)), "test", settings)
    templated = numpy_reference(samples, model, masks=False)["lungs_hidden"]["logits"]
    assert not np.allclose(scores["lungs_hidden"].logits, templated, atol=1e-4)


# ------------------------------------------------------------------------------------------- verdict


def _metrics(ba, ba_ci, recalls, recall_cis=None, specs=None, spec_cis=None) -> dict:
    classes = ("A", "B", "C")
    recall_cis = recall_cis or [[r, r] for r in recalls]
    specs = specs or [0.5, 0.5, 0.5]
    spec_cis = spec_cis or [[s, s] for s in specs]
    return {
        "balanced_accuracy": ba,
        "per_class": {c: {"recall": r, "specificity": s} for c, r, s in zip(classes, recalls, specs)},
        "intervals": {
            "balanced_accuracy": ba_ci,
            "per_class": {
                c: {"recall": rc, "specificity": sc} for c, rc, sc in zip(classes, recall_cis, spec_cis)
            },
        },
    }


def _variants(intact, hidden, border) -> dict:
    return {
        name: {"metrics": m}
        for name, m in zip(("intact", "lungs_hidden", "border_only"), (intact, hidden, border))
    }


CHANCE = {"balanced_accuracy": 1 / 3, "accuracy": 0.4}
INTACT = _metrics(0.85, [0.8, 0.9], [0.7, 0.9, 0.95])


def test_verdict_lungs_hidden_above_chance_is_flagged():
    hidden = _metrics(0.6, [1 / 3 + MARGIN + 0.01, 0.7], [0.5, 0.6, 0.7])
    border = _metrics(0.34, [0.3, 0.4], [0.3, 0.3, 0.3])
    v = verdict(_variants(INTACT, hidden, border), CHANCE, ("A", "B", "C"), "template")
    assert v["shortcut_suspected"] and len(v["reasons"]) == 1
    assert v["line"].startswith("Shortcut suspected") and "lungs hidden" in v["line"]
    assert "template" in v["line"] and v["line"].count(".") <= 8  # one sentence (decimals aside)


def test_verdict_just_above_chance_is_not_flagged():
    hidden = _metrics(0.45, [1 / 3 + MARGIN - 0.01, 0.55], [0.5, 0.4, 0.45])
    border = _metrics(0.34, [0.3, 0.4], [0.3, 0.3, 0.3])
    v = verdict(_variants(INTACT, hidden, border), CHANCE, ("A", "B", "C"), "shards")
    assert not v["shortcut_suspected"] and v["line"].startswith("No shortcut found")
    assert "per-image masks" in v["line"]


def test_verdict_class_read_from_the_border_is_flagged():
    hidden = _metrics(0.34, [0.3, 0.4], [0.3, 0.3, 0.4])
    # C keeps 0.96 of 0.95 with specificity 0.9: the frame tells C apart
    border = _metrics(
        0.5,
        [0.45, 0.55],
        [0.1, 0.4, 0.96],
        [[0, 0.2], [0.3, 0.5], [0.9, 1.0]],
        [0.9, 0.6, 0.9],
        [[0.8, 1], [0.5, 0.7], [0.85, 0.95]],
    )
    v = verdict(_variants(INTACT, hidden, border), CHANCE, ("A", "B", "C"), "template")
    assert v["shortcut_suspected"]
    assert len(v["reasons"]) == 1 and "C keeps recall 0.96" in v["reasons"][0]


def test_verdict_collapse_is_not_a_shortcut():
    """ResNet18 in the issue: every occluded image pushed to one class, recall 0.94, balanced accuracy at
    chance. That class's specificity is near 0, so its Youden J is not above the margin: no flag."""
    hidden = _metrics(0.36, [0.32, 0.40], [0.94, 0.1, 0.04], specs=[0.05, 0.97, 0.98])
    border = _metrics(
        0.35,
        [0.31, 0.39],
        [0.94, 0.08, 0.03],
        [[0.9, 0.98], [0, 0.2], [0, 0.1]],
        [0.06, 0.96, 0.99],
        [[0.02, 0.1], [0.9, 1], [0.95, 1]],
    )
    v = verdict(_variants(INTACT, hidden, border), CHANCE, ("A", "B", "C"), "template")
    assert not v["shortcut_suspected"] and v["reasons"] == []


def test_verdict_model_at_chance_is_inconclusive():
    at_chance = _metrics(0.34, [0.3, 0.4], [0.3, 0.4, 0.3])
    v = verdict(_variants(at_chance, at_chance, at_chance), CHANCE, ("A", "B", "C"), "template")
    assert not v["shortcut_suspected"] and v["line"].startswith("Inconclusive")


def test_verdict_lung_mask_focus_model_is_not_testable_by_occlusion():
    """A lung_focus = "mask" model sees a blank image with the lungs hidden or only the border visible:
    chance there is automatic, so the verdict says the test cannot tell rather than "no shortcut"."""
    hidden = _metrics(0.34, [0.3, 0.4], [1.0, 0.0, 0.0], specs=[0.0, 1.0, 1.0])
    v = verdict(_variants(INTACT, hidden, hidden), CHANCE, ("A", "B", "C"), "template", lung_focus="mask")
    assert not v["shortcut_suspected"] and v["line"].startswith("Not testable by occlusion")
    plain = verdict(_variants(INTACT, hidden, hidden), CHANCE, ("A", "B", "C"), "template")
    assert plain["line"].startswith("No shortcut found")


# ----------------------------------------------------------------------------------------- bad input


def test_missing_run_is_one_line_exit_2(tmp_path, capsys):
    write_shards(tmp_path / "s", {"test": [4]}, image_size=SIZE)
    code = run_main(main, [str(tmp_path / "nope"), "--shards", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "nope" in err


def _model_dir(path: Path, classes=("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")) -> Path:
    """A seed_cnn best/ folder (random weights) for 100 px shards."""
    from cxrdist.artifacts import export_model
    from cxrdist.models import seed_cnn

    meta = {
        "model": {"name": "seed_cnn", "in_chans": 1},
        "classes": list(classes),
        "image_size": 100,
        "normalization": {"mean": [0.449], "std": [0.226]},
    }
    export_model(seed_cnn(len(classes), 1).state_dict(), meta, path / "best")
    return path


def test_shards_with_other_classes_are_one_line_exit_2(tmp_path, capsys):
    run = _model_dir(tmp_path / "run")
    write_shards(tmp_path / "s", {"test": [4]}, image_size=100, classes=("A", "B", "C", "D"))
    code = run_main(main, [str(run), "--shards", str(tmp_path / "s"), "--num-workers", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "classes" in err
    assert not (run / "audit.json").exists()


def test_existing_out_needs_force(tmp_path, capsys):
    run = _model_dir(tmp_path / "run")
    write_shards(tmp_path / "s", {"test": [4]}, image_size=100)
    (run / "audit.json").write_text("{}")
    code = run_main(main, [str(run), "--shards", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--force" in err and (run / "audit.json").read_text() == "{}"


# --------------------------------------------------------------------------- real trainings (slow lane)

# The study CNN on synthetic radiographs with their lung masks: 100 per class, 112 px (its smallest size
# with some margin), 15 epochs of AdamW: about 10 s on 2 cores, intact balanced accuracy ~0.7 (clean).
CNN_RECIPE = "recipes/cnn.toml"
CNN_SETS = (
    "train.epochs=15",
    "train.per_device_batch_size=16",
    "data.num_workers=0",
    "optim.name=adamw",
    "optim.lr=3e-3",
    "optim.lr_base_batch=0",
    "eval.bootstrap_resamples=200",
    "eval.gradcam_per_class=2",
    "train.mixed_precision=no",  # fp32 like the audit command, so their numbers can be compared
)


def _trained(tmp: Path, shortcut: str) -> Path:
    from shard_tools.pack import pack
    from shard_tools.synth import generate

    src = generate(tmp / "src", per_class=100, size=128, masks=True, shortcut=shortcut, workers=1)
    shards = tmp / "shards"
    pack(src, shards, size=112, min_shards=2, shard_size=25, workers=1, progress=False)
    run = tmp / "run"
    sets = (f"run.dir={run}", f"data.shards={shards}", *CNN_SETS)
    res = run_module("cxrdist.train", CNN_RECIPE, *(a for s in sets for a in ("--set", s)))
    assert res.returncode == 0, res.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def shortcut_run(tmp_path_factory) -> Path:
    return _trained(tmp_path_factory.mktemp("shortcut"), "corner")


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    return _trained(tmp_path_factory.mktemp("clean"), "none")


def _audit(run: Path) -> dict:
    return json.loads((run / "audit.json").read_text())


@pytest.mark.slow
def test_planted_shortcut_is_flagged(shortcut_run):
    report = _audit(shortcut_run)
    assert report["mask_source"] == "shards"
    assert report["verdict"]["shortcut_suspected"], report["verdict"]
    assert report["verdict"]["line"].startswith("Shortcut suspected")
    # Training's summary ends with the line; the pictures and Grad-CAM's share are there.
    assert (shortcut_run / "audit_examples.png").is_file() and (shortcut_run / "audit_visible.png").is_file()
    assert report["gradcam"]["region"] == "mask" and 0 <= report["gradcam"]["inside_share_mean"] <= 1
    # The study CNN at 112 px never sees its bottom and right 12 px or so (models.py): about 80% visible.
    assert 0.7 < report["visible_region"]["fraction"] < 0.85


@pytest.mark.slow
def test_clean_set_is_not_flagged(clean_run):
    report = _audit(clean_run)
    intact = report["variants"]["intact"]["metrics"]
    # A real "no": the model learned the clean set well above chance, yet loses it with the lungs hidden.
    assert intact["intervals"]["balanced_accuracy"][0] > report["chance"]["balanced_accuracy"] + MARGIN
    assert not report["verdict"]["shortcut_suspected"], report["verdict"]
    assert report["verdict"]["line"].startswith("No shortcut found")


@pytest.mark.slow
def test_cli_same_numbers_on_one_and_two_ranks(shortcut_run, tmp_path):
    """The command under the real launcher: intervals and verdict identical on 1 and 2 ranks (3 test shards),
    and what training wrote (same model, seed and resamples)."""
    shards = shortcut_run.parent / "shards"
    reports = []
    for ranks in (1, 2):
        out = tmp_path / f"audit{ranks}.json"
        res = accelerate_launch(
            ranks, "cxrdist.audit", shortcut_run, "--shards", shards, "--out", out, "--num-workers", "1"
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.strip().splitlines()[-1] == _audit(shortcut_run)["verdict"]["line"]
        reports.append(json.loads(out.read_text()))
    one, two = reports
    assert one["variants"] == two["variants"] and one["verdict"] == two["verdict"]
    # Training scored in channels_last (its default for seed_cnn on a CPU): the same predictions, floats
    # that may differ in the last bits.
    trained = _audit(shortcut_run)["variants"]
    for name, variant in one["variants"].items():
        m, t = variant["metrics"], trained[name]["metrics"]
        assert m["confusion_matrix"] == t["confusion_matrix"]
        assert m["macro"]["roc_auc"] == pytest.approx(t["macro"]["roc_auc"], abs=1e-3)


def test_per_source_metrics_when_pack_recorded_sources(tmp_path):
    """Sources in the samples' provenance give metrics with intervals per source; none give null."""
    from cxrdist.audit import per_source

    def source(key: str, label: int) -> dict:
        return {"group": f"g{label}", "source": "https://a.example" if label < 2 else "https://b.example"}

    settings = ScoringSettings(device=torch.device("cpu"), batch_size=4, num_workers=0, in_chans=1)
    options = AuditOptions(None, 50, 0)
    for folder, extra in (("with", source), ("without", None)):
        write_shards(tmp_path / folder, {"test": [7, 9]}, image_size=SIZE, provenance_extra=extra)
        manifest = read_manifest(str(tmp_path / folder))
        scores = score_variants(TinyModel().eval(), manifest, "test", settings)
        found = per_source(scores["intact"], manifest, "test", manifest.classes, options)
        if extra is None:
            assert found is None
            continue
        assert sorted(found) == ["https://a.example", "https://b.example"]
        a = found["https://a.example"]
        assert a["num_samples"] == 8 and a["intervals"]["settings"]["resamples"] == 50


def test_eval_batches_carry_the_shards_masks(tmp_path):
    """The loader's masks are each sample's own (True = lung); a manifest without masks cannot give them."""
    from cxrdist.data import eval_batches

    samples = write_shards(tmp_path / "m", {"test": [5, 4]}, image_size=SIZE, masks=True)
    manifest = read_manifest(str(tmp_path / "m"))
    seen = 0
    for images, _labels, keys, masks in eval_batches(
        manifest, "test", batch_size=3, rank=0, world_size=1, num_workers=0, masks=True
    ):
        assert masks.dtype == torch.bool and masks.shape == images.shape
        for key, mask in zip(keys, masks, strict=True):
            np.testing.assert_array_equal(mask[0].numpy(), samples[key].mask)
            seen += 1
    assert seen == 9
    write_shards(tmp_path / "plain", {"test": [3]}, image_size=SIZE)
    with pytest.raises(ValueError, match="lung masks"):
        next(
            eval_batches(
                read_manifest(str(tmp_path / "plain")),
                "test",
                batch_size=2,
                rank=0,
                world_size=1,
                num_workers=0,
                masks=True,
            )
        )
