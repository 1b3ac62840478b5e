"""The outputs step: what a training run writes once its last epoch has ended (`write_outputs`).

Every rank calls it after `cxrdist.train.fit`'s loop; it loads the best weights into the evaluation model,
and the collective part (calibration on val, the test split, the shortcut audit's occluded test variants)
runs identically on every rank; only the main process writes. Into run.dir (names in `cxrdist.rundir`):
best/meta.json gains its "calibration" (eval.calibrate, when an epoch was best); test_metrics.json; the
confusion, ROC, reliability and training-curve plots; gradcam/ with its summary (eval.gradcam_per_class);
audit.json and its pictures (`cxrdist.audit`); report.html last, built from all of these. The terminal gets
the test table, every file written (the report last), then the audit's verdict line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cxrdist.artifacts import provenance
from cxrdist.checkpoint import TrainState
from cxrdist.evaluate import MetricOptions, SplitScores, full_metrics, write_plots
from cxrdist.rundir import (
    AUDIT_FILE,
    BEST_DIR,
    BEST_META,
    CONFUSION_PNG,
    CURVES_PNG,
    EXPLAIN_SUMMARY,
    GRADCAM_DIR,
    RELIABILITY_PNG,
    ROC_PNG,
    TEST_METRICS_FILE,
    read_metrics_rows,
)
from cxrdist.trainrun import (
    Run,
    TrainError,
    check_data_unchanged,
    eval_model,
    eval_settings,
    say,
    score_split,
)
from shard_tools.cli import stdout_console
from shard_tools.errors import CxrdistError
from shard_tools.files import atomic_write_json


def write_outputs(run: Run, state: TrainState, best_state: dict[str, torch.Tensor] | None) -> None:
    """Calibrate and test the best weights, identically on every rank; then the main process writes
    (`finish_outputs`). `best_state` is None when no epoch became the best: the model is tested as it is."""
    cfg = run.cfg
    if best_state is not None:
        eval_model(run).load_state_dict(best_state)
    temperature = calibrate(run) if cfg.eval.calibrate and state.best_epoch else None
    test = score_split(run, "test", tta=cfg.eval.tta)
    check_data_unchanged(run, "the test evaluation")
    audit = score_audit(run)
    if run.accelerator.is_main_process:
        finish_outputs(run, state, test, temperature, audit)


def score_audit(run: Run) -> dict[str, SplitScores]:
    """The test split under the shortcut audit's occlusions (`cxrdist.audit`), the same on every rank."""
    from cxrdist.audit import score_variants

    acc = run.accelerator
    return score_variants(
        eval_model(run),
        run.manifest,
        "test",
        eval_settings(run),
        rank=acc.process_index,
        world_size=acc.num_processes,
    )


def calibrate(run: Run) -> float:
    """Fit one temperature on the validation split (the best weights) and keep it in best/meta.json, where
    evaluate, predict and the ONNX export apply it. Same value on every rank; the main process writes."""
    from cxrdist.stats.calibration import fit_temperature, negative_log_likelihood

    scores = score_split(run, "val")
    temperature = fit_temperature(scores.logits, scores.labels)
    if run.accelerator.is_main_process:
        meta_path = run.run_dir / BEST_META
        meta = json.loads(meta_path.read_text())
        meta["calibration"] = {
            "temperature": temperature,
            "fitted_on": "val",
            "method": "temperature scaling: one T > 0 minimising the NLL of softmax(logits / T)",
            "val_nll_before": negative_log_likelihood(scores.logits, scores.labels),
            "val_nll_after": negative_log_likelihood(scores.logits, scores.labels, temperature),
        }
        atomic_write_json(meta_path, meta)
    say(run.accelerator, f"calibration: temperature {temperature:.3f} fitted on the validation split")
    return temperature


def finish_outputs(
    run: Run, state: TrainState, test: SplitScores, temperature: float | None, audit: dict[str, SplitScores]
) -> None:
    """test_metrics.json, plots, the Grad-CAM grid, the shortcut audit and report.html; print the result
    table and every file written, the report last, then the audit's verdict. Main process only."""
    from cxrdist.plots import plot_curves
    from cxrdist.tables import print_metrics_table

    cfg, classes, run_dir = run.cfg, run.manifest.classes, run.run_dir
    options = MetricOptions(
        temperature=temperature, tta=cfg.eval.tta, resamples=cfg.eval.bootstrap_resamples, seed=cfg.run.seed
    )
    metrics = full_metrics(test, classes, options)
    out = {**metrics, "best_epoch": state.best_epoch, "split": "test", "provenance": provenance()}
    out["precision"] = {"mixed_precision": run.mixed_precision}  # as evaluate writes it
    atomic_write_json(run_dir / TEST_METRICS_FILE, out)
    title = f"test, best epoch {state.best_epoch}"
    plots = {
        "confusion": run_dir / CONFUSION_PNG,
        "roc": run_dir / ROC_PNG,
        "reliability": run_dir / RELIABILITY_PNG,
    }
    written = [
        run_dir / TEST_METRICS_FILE,
        *write_plots(metrics, test, options, classes, plots, title),
        plot_curves(read_metrics_rows(run_dir), run_dir / CURVES_PNG),
    ]
    console = stdout_console()
    print_metrics_table(metrics, classes, console, title=f"test split (best epoch {state.best_epoch})")
    if cfg.eval.gradcam_per_class and state.best_epoch:
        written.append(gradcam(run))
    verdict, audit_files = write_audit(run, audit, temperature)
    written += audit_files
    written.append(write_report(run_dir))
    console.print(f"run directory: {run_dir}")
    for path in written:
        console.print(f"  {path}", highlight=False)
    console.print(verdict, highlight=False)


def write_audit(run: Run, audit: dict[str, SplitScores], temperature: float | None) -> tuple[str, list[Path]]:
    """audit.json and its pictures (`cxrdist.audit`); returns the verdict's line and the files written."""
    from cxrdist.audit import AuditOptions, AuditSetup, finish_audit

    cfg, run_dir = run.cfg, run.run_dir
    summary = run_dir / GRADCAM_DIR / EXPLAIN_SUMMARY
    setup = AuditSetup(
        split="test",
        options=AuditOptions(temperature, cfg.eval.bootstrap_resamples, cfg.run.seed),
        in_chans=run.in_chans,
        device=run.accelerator.device,
        lung_focus=cfg.data.lung_focus,
        gradcam_summary=summary if summary.exists() else None,
        provenance={
            "model": str(run_dir / BEST_DIR),
            "shards": run.manifest.source,
            "mixed_precision": run.mixed_precision,
        },
    )
    report, written = finish_audit(audit, eval_model(run), run.manifest, run_dir / AUDIT_FILE, setup)
    return report["verdict"]["line"], written


def gradcam(run: Run) -> Path:
    """The Grad-CAM grid of test images per class, and its summary (run.dir/gradcam/)."""
    from cxrdist.artifacts import load_trained_model
    from cxrdist.explain import explain_shards

    out = run.run_dir / GRADCAM_DIR
    model, meta = load_trained_model(run.run_dir, run.accelerator.device)
    summary = explain_shards(
        model, meta, run.manifest.source, out, run.cfg.eval.gradcam_per_class, "test", run.accelerator.device
    )
    atomic_write_json(out / EXPLAIN_SUMMARY, {"model": str(run.run_dir / BEST_DIR), "shards": summary})
    return Path(summary["grid"])


def write_report(run_dir: Path) -> Path:
    """report.html; a failure says that every result is written and how to build the page again."""
    from cxrdist.report import write_report as write

    try:
        return write(run_dir)
    except (CxrdistError, OSError) as e:
        raise TrainError(
            f"the run's results are written, but not report.html ({e}); build it with "
            f"`python -m cxrdist.report {run_dir}` once the problem is fixed"
        ) from None
