"""Export a trained model to one ONNX file that takes stored pixels and returns class probabilities.

    python -m cxrdist.export RUN_OR_MODEL --out model.onnx [--input-dtype uint8|float32]
                             [--no-temperature] [--force]

RUN_OR_MODEL is a run directory (its `best/` is exported) or a directory with model.safetensors +
meta.json. The graph holds everything between `shard_tools.images.load_gray` and the probabilities, so a
deployment feeds it raw pixels and needs neither torch nor cxrdist's preprocessing (see
`cxrdist.onnx_model` for the graph's contract and its metadata):

    uint8 (N, 1, S, S) 0..255  ->  lung focus  ->  x / 255  ->  (x - mean[c]) / std[c], gray repeated to
    in_chans  ->  model  ->  logits / T  ->  softmax  ->  float32 (N, K)

which is `cxrdist.lungs.focus` (the model's meta.json preprocess.lung_focus; nothing when "off"),
`cxrdist.augment.eval_transform`, the model and a softmax, as `cxrdist.predict` computes them.
T is meta.json's `calibration.temperature` when the run was calibrated (`--no-temperature`: leave it out).
`--input-dtype float32` makes the input float32 holding the same 0..255 values, for runtimes that
cannot feed uint8 tensors.

Exporter: `torch.onnx.export(dynamo=True)` (torch.export + onnxscript, all local, no network), opset 20,
the batch dimension dynamic. The TorchScript exporter (`dynamo=False`) is deprecated since torch 2.9 and
warns so. The export runs on the CPU, then onnxruntime runs the file on a few random images and the
export fails unless its probabilities match PyTorch's within `MAX_ABS_DIFF`. The file is written
atomically; an existing `--out` is replaced only with `--force`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import cxrdist
from cxrdist.artifacts import ModelMeta, find_model_dir, load_trained_model
from cxrdist.augment import normalize_stats
from cxrdist.cli import refuse_existing
from cxrdist.lungs import focus_values
from cxrdist.onnx_model import FORMAT, INPUT_DTYPES, INPUT_NAME, ONNX_SUFFIX, OUTPUT_NAME, load_onnx
from shard_tools.cli import run_main
from shard_tools.errors import CxrdistError, InputError, Terminated
from shard_tools.files import atomic_write_bytes
from shard_tools.locks import output_lock

OPSET = 20  # torch 2.14's native opset for the dynamo exporter (no version conversion); onnxruntime >= 1.17
MAX_ABS_DIFF = 1e-4  # largest |probability| difference between onnxruntime and PyTorch the export accepts
CHECK_IMAGES = 3  # random images in the post-export check (3, not the traced 2: the batch really is dynamic)

__all__ = ["ExportResult", "InferenceGraph", "export_onnx", "main", "onnx_metadata"]


class InferenceGraph(nn.Module):
    """Stored pixels to probabilities: 0..255 (N, 1, S, S), uint8 or float -> float32 (N, K).

    First the model's lung focus (`cxrdist.lungs.focus_values`, the code `focus` runs, on float 0..255
    values so that a float32 input gets it too). The normalisation is `eval_transform`'s: x / 255, then one
    multiply-add with (1/std, -mean/std), whose (1, C, 1, 1) shape broadcasts the gray channel to the
    model's C channels.
    """

    def __init__(
        self, model: nn.Module, in_chans: int, temperature: float | None, lung_focus: str = "off"
    ) -> None:
        super().__init__()
        self.lung_focus = lung_focus
        mean, std = normalize_stats(in_chans)
        self.model = model
        self.register_buffer("scale", torch.tensor([1.0 / s for s in std]).view(1, in_chans, 1, 1))
        self.register_buffer(
            "shift", torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, in_chans, 1, 1)
        )
        self.temperature = temperature

    def forward(self, image: Tensor) -> Tensor:
        x = focus_values(image.to(torch.float32), self.lung_focus) / 255  # (N, 1, S, S) in [0, 1]
        x = torch.addcmul(self.shift, x, self.scale)  # (N, C, S, S), normalised
        logits = self.model(x)  # (N, K)
        if self.temperature is not None:
            logits = logits / self.temperature
        return logits.softmax(dim=1)


def onnx_metadata(meta: ModelMeta, temperature: float | None, input_dtype: str) -> dict[str, str]:
    """The model file's metadata_props (see `cxrdist.onnx_model`); every value is JSON text."""
    mean, std = normalize_stats(meta.in_chans)
    values: dict[str, Any] = {
        "cxrdist_format": FORMAT,
        "classes": list(meta.classes),
        "image_size": meta.image_size,
        "model_name": meta.model_name,
        "in_chans": meta.in_chans,
        "input_dtype": input_dtype,
        "normalization": {
            "mean": list(mean),
            "std": list(std),
            "input": f"{input_dtype} gray 0..255 / 255, repeated to in_chans channels",
        },
        "temperature": temperature,
        "preprocess": {"lung_focus": meta.lung_focus, "input": "applied inside the graph"},
        "cxrdist_version": cxrdist.__version__,
        "trained_with": {
            "epoch": meta.data.get("epoch"),
            "provenance": meta.data.get("provenance"),
            "best_metric": meta.data.get("best_metric"),
        },
    }
    return {key: json.dumps(value) for key, value in values.items()}


def _sample(n: int, image_size: int, input_dtype: str, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, image_size, image_size), dtype=torch.uint8, generator=g)
    return images if input_dtype == "uint8" else images.float()


def onnx_bytes(graph: InferenceGraph, meta: ModelMeta, metadata: dict[str, str], input_dtype: str) -> bytes:
    """The serialised ONNX model of `graph` (on the CPU, in eval mode) with `metadata` as metadata_props."""
    import onnx

    example = _sample(2, meta.image_size, input_dtype, seed=0)  # 2: a batch of 1 would be specialised
    program = torch.onnx.export(
        graph,
        (example,),
        dynamo=True,
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
        verbose=False,
    )
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata)
    s, k = meta.image_size, len(meta.classes)
    proto.doc_string = (
        f"cxrdist {meta.model_name} classifier. Input {INPUT_NAME!r}: {input_dtype} (N, 1, {s}, {s}) gray"
        f" 0..255. Output {OUTPUT_NAME!r}: float32 (N, {k}) probabilities of {', '.join(meta.classes)}."
    )
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


@dataclass(frozen=True)
class ExportResult:
    out: Path
    model_dir: Path
    meta: ModelMeta
    temperature: float | None
    input_dtype: str
    max_abs_diff: float  # onnxruntime vs PyTorch on CHECK_IMAGES random images
    size_bytes: int


def _load(run_or_model: str | Path) -> tuple[Path, nn.Module, ModelMeta]:
    """The model on the CPU, in eval mode. A missing or bad model directory raises an InputError
    (`ModelDirError`, or `ModelError` for a model name this timm does not know)."""
    model_dir = find_model_dir(run_or_model)
    model, meta = load_trained_model(model_dir, torch.device("cpu"))
    return model_dir, model, meta


def _check_out(out: Path, force: bool) -> None:
    if out.suffix.lower() != ONNX_SUFFIX:
        raise InputError(
            f"--out {out}: name the file *{ONNX_SUFFIX} (cxrdist.predict recognises models by it)"
        )
    if out.is_dir():
        raise InputError(f"--out {out} is a directory; name a file, e.g. {out / 'model.onnx'}")
    refuse_existing([out], force)


def export_onnx(
    run_or_model: str | Path,
    out: str | Path,
    input_dtype: str = "uint8",
    use_temperature: bool = True,
    force: bool = False,
) -> ExportResult:
    """Export the model of `run_or_model` (a run's best/) to `out`; see the module docstring.

    Raises InputError for a missing or unreadable model, a bad temperature, or an `out` that exists
    (without `force`) or does not end in .onnx; CxrdistError when onnxruntime disagrees with PyTorch or the
    file cannot be written.
    """
    out = Path(out)
    if input_dtype not in INPUT_DTYPES:
        raise InputError(f"--input-dtype {input_dtype!r}: choose one of {', '.join(INPUT_DTYPES)}")
    _check_out(out, force)
    model_dir, model, meta = _load(run_or_model)
    temperature = meta.temperature if use_temperature else None
    graph = InferenceGraph(model, meta.in_chans, temperature, meta.lung_focus).eval()
    try:
        with signals_deferred():
            data = onnx_bytes(graph, meta, onnx_metadata(meta, temperature, input_dtype), input_dtype)
    except ImportError as e:
        raise CxrdistError(f"ONNX export needs the onnx extra ({e}): pip install 'cxrdist[onnx]'") from None
    diff = _check(graph, data, meta, input_dtype)
    try:
        atomic_write_bytes(out, data)
    except OSError as e:
        raise CxrdistError(f"cannot write {out} ({e}); nothing was written") from None
    return ExportResult(out, model_dir, meta, temperature, input_dtype, diff, len(data))


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGTERM and Ctrl-C wait for the end of the block, then stop the command as anywhere else (exit 143 or
    130, one line). Raised inside `torch.onnx.export` they would surface as its `TorchExportError` (a
    traceback, exit 1) or leave `torch._dynamo` half imported. The exporter runs for seconds, not minutes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    stops = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum)) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:  # replaces whatever the exporter raised meanwhile: the user asked to stop
            raise (KeyboardInterrupt() if received[0] == signal.SIGINT else Terminated()) from None


def _check(graph: InferenceGraph, data: bytes, meta: ModelMeta, input_dtype: str) -> float:
    """Max |onnxruntime - PyTorch| probability on CHECK_IMAGES random images; raises past MAX_ABS_DIFF."""
    images = _sample(CHECK_IMAGES, meta.image_size, input_dtype, seed=1)
    with torch.no_grad():
        expected = graph(images).numpy()
    with tempfile.TemporaryDirectory() as tmp:  # onnxruntime and the metadata check both read a file
        path = Path(tmp) / "check.onnx"
        path.write_bytes(data)
        got = load_onnx(path, threads=1).predict(images.numpy())
    diff = float(np.abs(got - expected).max())
    if not diff <= MAX_ABS_DIFF:  # also catches NaN
        raise CxrdistError(
            f"the exported graph disagrees with PyTorch (max |probability difference| {diff:.2e} > "
            f"{MAX_ABS_DIFF:g}); nothing was written. Please report this with the model name "
            f"{meta.model_name!r}."
        )
    return diff


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cxrdist.export", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "model", help="run directory (uses best/) or a directory with model.safetensors + meta.json"
    )
    p.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    p.add_argument(
        "--input-dtype",
        choices=INPUT_DTYPES,
        default="uint8",
        help="dtype of the graph's input, which holds 0..255 gray values either way (default uint8)",
    )
    p.add_argument(
        "--no-temperature",
        action="store_true",
        help="leave meta.json's calibration temperature out of the graph (uncalibrated probabilities)",
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with output_lock(args.out, f"export --out {args.out}"):  # one writer per file (shard_tools.locks)
        return export_main(args)


def export_main(args: argparse.Namespace) -> int:
    r = export_onnx(args.model, args.out, args.input_dtype, not args.no_temperature, args.force)
    s = r.meta.image_size
    temperature = f"temperature {r.temperature:g}" if r.temperature is not None else "no temperature"
    print(f"exported {r.model_dir} ({r.meta.model_name}, {len(r.meta.classes)} classes, {temperature})")
    print(f"  input  {INPUT_NAME}: {r.input_dtype} (N, 1, {s}, {s}) gray 0..255")
    print(f"  output {OUTPUT_NAME}: float32 (N, {len(r.meta.classes)}) {', '.join(r.meta.classes)}")
    print(f"  onnxruntime vs PyTorch: max |difference| {r.max_abs_diff:.1e} on {CHECK_IMAGES} images")
    print(f"  {r.out} ({r.size_bytes / 1e6:.1f} MB, opset {OPSET})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
