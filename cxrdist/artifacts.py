"""A trained model on disk: the exported model folder (`best/`: model.safetensors + meta.json), finding and
loading it, and the provenance every output records (cxrdist version, git commit, torch version).

Contract of meta.json (`ModelMeta`): model name and input channels, class names in label order, image size,
normalisation, the preprocessing it was trained with (`preprocess.lung_focus`, absent = "off"), the
precision it was validated and tested in (`mixed_precision`: "no", "bf16" or "fp16"; absent = "no"),
and, once training has calibrated it, `calibration.temperature`. A model is only ever used with it, and
it is checked on load (`cxrdist.metadata`: well-formed fields, as many classes as the weights have
outputs, an image size the network takes). The folder is written through `shard_tools.files` (a temporary
folder, then a rename), so a crash or a full disk never leaves a half-written model that looks complete.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import cxrdist
from cxrdist.lungs import FOCUS_MODES
from cxrdist.metadata import (
    check_classes,
    check_image_size,
    check_in_chans,
    check_outputs,
    check_temperature,
)
from shard_tools.errors import CxrdistError, InputError
from shard_tools.files import atomic_write_json, replace_dir, staging_dir

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
MIXED_PRECISIONS = ("no", "bf16", "fp16")  # meta.json mixed_precision: "no" = fp32


class ArtifactError(CxrdistError):
    """A model or run directory cannot be written (disk full, no permission). Exit 1."""


class ModelDirError(InputError):
    """The model or run directory given is missing, incomplete or unreadable. Exit 2."""


def git_commit() -> str:
    """The commit of the cxrdist checkout in use, with "-dirty" for local changes; "unknown" if not git."""
    here = Path(cxrdist.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def provenance() -> dict[str, str]:
    return {
        "cxrdist_version": cxrdist.__version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
    }


@dataclass(frozen=True)
class ModelMeta:
    """What a saved model needs to be used correctly: read from `meta.json` beside the weights."""

    model_name: str
    in_chans: int
    classes: tuple[str, ...]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    temperature: float | None  # calibration.temperature, fitted on the validation split; None: none fitted
    data: dict[str, Any]  # the whole meta.json
    lung_focus: str = "off"  # preprocess.lung_focus (cxrdist.lungs.focus); absent in older models: "off"
    # The precision training validated and tested the model in ("no" = fp32, "bf16", "fp16"): evaluate's
    # default, so that one model gives one set of numbers. Absent in older models: "no".
    mixed_precision: str = "no"

    @staticmethod
    def from_dict(data: dict[str, Any], source: str) -> ModelMeta:
        try:
            meta = ModelMeta(
                model_name=str(data["model"]["name"]),
                in_chans=check_in_chans(data["model"]["in_chans"], source),
                classes=check_classes(data["classes"], source),
                image_size=check_image_size(data["image_size"], source),
                mean=tuple(float(v) for v in data["normalization"]["mean"]),
                std=tuple(float(v) for v in data["normalization"]["std"]),
                temperature=check_temperature((data.get("calibration") or {}).get("temperature"), source),
                data=data,
                lung_focus=(data.get("preprocess") or {}).get("lung_focus", "off"),
                mixed_precision=data.get("mixed_precision", "no"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelDirError(f"{source}: not a cxrdist meta.json (missing or bad field {e})") from None
        if len(meta.mean) != meta.in_chans or len(meta.std) != meta.in_chans:
            raise ModelDirError(f"{source}: normalization needs {meta.in_chans} means and stds (in_chans)")
        if not all(math.isfinite(v) for v in meta.mean) or not all(0 < v < math.inf for v in meta.std):
            raise ModelDirError(f"{source}: normalization needs finite means and positive stds")
        if meta.mixed_precision not in MIXED_PRECISIONS:
            raise ModelDirError(
                f"{source}: mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got "
                f"{meta.mixed_precision!r:.40}"
            )
        if meta.lung_focus not in FOCUS_MODES:
            raise ModelDirError(
                f"{source}: preprocess.lung_focus must be one of {', '.join(FOCUS_MODES)}, got "
                f"{meta.lung_focus!r}"
            )
        return meta


def model_meta(
    model_name: str,
    in_chans: int,
    classes: tuple[str, ...],
    image_size: int,
    training: dict[str, Any],
    lung_focus: str = "off",
    mixed_precision: str = "no",
) -> dict[str, Any]:
    """meta.json of a newly trained model: the writer's side of `ModelMeta.from_dict`. The fields it reads
    (model, classes in label order, image size, the normalisation `in_chans` implies), then `training`
    (where the weights come from: epoch, ema, best_metric, val_metrics) and the provenance."""
    from cxrdist.augment import normalize_stats

    mean, std = normalize_stats(in_chans)
    return {
        "model": {"name": model_name, "in_chans": in_chans},
        "classes": list(classes),
        "image_size": image_size,
        "normalization": {"mean": list(mean), "std": list(std), "input": "uint8 gray / 255"},
        "preprocess": {"lung_focus": lung_focus},  # cxrdist.lungs.focus, before the normalisation
        "mixed_precision": mixed_precision,  # what validation and the test ran in: evaluate's default
        **training,
        "provenance": provenance(),
    }


def export_model(state_dict: dict[str, torch.Tensor], meta: dict[str, Any], out_dir: Path) -> None:
    """Write `out_dir/model.safetensors` + `out_dir/meta.json` atomically as one directory.

    Raises `ArtifactError` when the files cannot be written (disk full, no permission); then nothing of
    the attempt is left behind and a previous `out_dir` is still there, complete.
    """
    out_dir = Path(out_dir)
    tmp = None
    try:
        tmp = staging_dir(out_dir)
        # safetensors wants contiguous, unshared tensors; channels_last weights are not contiguous.
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        atomic_write_json(tmp / META_FILE, meta)
        replace_dir(tmp, out_dir)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):
            raise
        # OSError, or safetensors' own error type for the same I/O failures
        kept = "the previous one is unchanged" if (out_dir / MODEL_FILE).exists() else "nothing was written"
        raise ArtifactError(
            f"cannot write the model to {out_dir} ({type(e).__name__}: {e}); {kept}. Free space in "
            f"{out_dir.parent} or choose another directory."
        ) from e


def find_model_dir(run_or_model: str | Path) -> Path:
    """A run directory (uses its `best/`) or a directory holding model.safetensors + meta.json."""
    path = Path(run_or_model)
    if path.is_file() and path.name == MODEL_FILE:
        path = path.parent
    for candidate in (path, path / "best"):
        if (candidate / MODEL_FILE).is_file() and (candidate / META_FILE).is_file():
            return candidate
    if not path.exists():
        raise ModelDirError(f"{path}: no such run or model directory")
    raise ModelDirError(
        f"{path}: no {MODEL_FILE} + {META_FILE} here or in {path / 'best'}. Pass a run directory that "
        "finished at least one epoch, or a directory holding both files."
    )


def load_model_files(model_dir: Path) -> tuple[dict[str, torch.Tensor], ModelMeta]:
    """The weights and meta.json of a model directory. Raises `ModelDirError` naming the bad file."""
    model_dir = Path(model_dir)
    try:
        meta = ModelMeta.from_dict(
            json.loads((model_dir / META_FILE).read_text()), str(model_dir / META_FILE)
        )
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{model_dir / META_FILE}: cannot be read as JSON ({e})") from None
    try:
        weights = load_file(str(model_dir / MODEL_FILE))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ModelDirError(f"{model_dir / MODEL_FILE}: cannot read weights ({e})") from None
    return weights, meta


def check_head(
    expected: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], classes: tuple[str, ...], source: str
) -> None:
    """Refuse weights whose output layer has another class count than meta.json names (a metadata edit or
    a meta.json from another model). `expected`: the state dict of the model built for `classes`."""
    k = len(classes)
    head_outputs = {
        tuple(weights[name].shape)[0]
        for name, tensor in expected.items()
        if name in weights
        and tensor.ndim >= 1
        and tensor.shape[0] == k
        and weights[name].ndim == tensor.ndim
        and weights[name].shape[1:] == tensor.shape[1:]
        and weights[name].shape[0] != k
    }
    if len(head_outputs) == 1:
        check_outputs(head_outputs.pop(), classes, source)


def load_trained_model(run_or_model: str | Path, device: torch.device) -> tuple[torch.nn.Module, ModelMeta]:
    """The model of a run's `best/` (or of a model.safetensors + meta.json directory), in eval mode."""
    from cxrdist.config import ModelConfig
    from cxrdist.models import ModelError, check_input_size, create_model

    model_dir = find_model_dir(run_or_model)
    weights, meta = load_model_files(model_dir)
    source = str(model_dir / META_FILE)
    try:
        check_input_size(meta.model_name, meta.image_size)
    except ModelError as e:
        raise ModelDirError(f"{source}: image_size {meta.image_size} does not fit the model ({e})") from None
    model = create_model(ModelConfig(name=meta.model_name, in_chans=meta.in_chans), len(meta.classes))
    check_head(model.state_dict(), weights, meta.classes, source)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:400]  # torch's message spans lines; one line here
        raise ModelDirError(f"{model_dir}: weights do not fit model '{meta.model_name}': {detail}") from None
    return model.to(device).eval(), meta
