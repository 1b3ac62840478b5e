"""Run an exported cxrdist ONNX model with onnxruntime alone: no torch, no timm (a deployment needs neither).

Contract of a model written by `python -m cxrdist.export` (the one place its names are defined)::

    input  "image":          uint8 (N, 1, S, S), gray 0..255 exactly as `shard_tools.images.load_gray`
                             returns it (S = the model's image size, N any); an export made with
                             `--input-dtype float32` takes float32 holding the same 0..255 values
    output "probabilities":  float32 (N, K), softmax over the classes in metadata order (rows sum to 1)
    inside the graph:        the model's lung focus (`cxrdist.lungs.focus`, when it was trained with one),
                             x / 255, (x - mean[c]) / std[c] with gray repeated to the model's channels,
                             the network, logits / temperature (when calibrated), softmax

    metadata_props (values are JSON text): cxrdist_format, classes, image_size, model_name, in_chans,
    input_dtype, normalization, temperature (null when none was applied), preprocess (informational: the
    graph applies it), cxrdist_version, trained_with

The metadata is checked on load against itself and against the graph's input and output shapes
(`cxrdist.metadata`): a tampered file is refused with one line. This module imports numpy, json,
`cxrdist.metadata` and onnxruntime only (onnxruntime when a model is loaded), so
`cxrdist.predict model.onnx ...` runs where torch is not installed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrdist.metadata import (
    MetadataError,
    check_classes,
    check_image_size,
    check_outputs,
    check_temperature,
)
from shard_tools.errors import CxrdistError, InputError

__all__ = [
    "FORMAT",
    "INPUT_DTYPES",
    "INPUT_NAME",
    "ONNX_SUFFIX",
    "OUTPUT_NAME",
    "OnnxClassifier",
    "is_onnx_file",
    "load_onnx",
]

FORMAT = "cxrdist-onnx-classifier/1"  # bump when the graph's inputs, outputs or metadata change meaning
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
INPUT_DTYPES = ("uint8", "float32")  # --input-dtype choices of the exporter
ONNX_SUFFIX = ".onnx"

# The keys `cxrdist.export` writes and `load_onnx` requires; each value is JSON text.
REQUIRED_KEYS = ("cxrdist_format", "classes", "image_size", "model_name", "in_chans", "input_dtype")

_ORT_INPUT_TYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32"}


def is_onnx_file(path: str | Path) -> bool:
    """Whether `path` names an ONNX model file (by its `.onnx` suffix; the exporter insists on it)."""
    return Path(path).suffix.lower() == ONNX_SUFFIX


@dataclass(frozen=True)
class OnnxClassifier:
    """An exported model, loaded in an onnxruntime session, with what its metadata says about it."""

    path: Path
    classes: tuple[str, ...]
    image_size: int  # S: inputs are (N, 1, S, S)
    input_dtype: str  # "uint8" or "float32": what the graph's input takes (always 0..255 values)
    model_name: str
    temperature: float | None  # the temperature divided into the logits inside the graph, if any
    metadata: dict[str, Any]  # every metadata_props entry, JSON-decoded
    session: Any = field(repr=False)  # onnxruntime.InferenceSession

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, 1, S, S) gray 0..255 -> float32 (N, K) class probabilities, classes in `self.classes`.

        A float32 export also accepts float arrays holding 0..255. Raises ValueError for any other dtype or
        shape (a caller's bug); it takes `np.stack([load_gray(p, self.image_size) for p in paths])[:, None]`.
        """
        images = np.asarray(images)
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (1, s, s):
            raise ValueError(f"expected images of shape (N, 1, {s}, {s}), got {images.shape}")
        if images.dtype == np.uint8:
            feed = images.astype(np.float32) if self.input_dtype == "float32" else images
        elif self.input_dtype == "float32" and np.issubdtype(images.dtype, np.floating):
            feed = images.astype(np.float32, copy=False)
        else:
            raise ValueError(
                f"expected uint8 images (0..255){' or float 0..255' if self.input_dtype == 'float32' else ''}"
                f", got {images.dtype}"
            )
        if images.shape[0] == 0:
            return np.empty((0, len(self.classes)), dtype=np.float32)
        (probs,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(feed)})
        return probs


def _providers(device: str, available: list[str]) -> list[str]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise InputError(
                "--device cuda: this onnxruntime has no CUDA provider (it has "
                f"{', '.join(available)}). Install onnxruntime-gpu, or use --device cpu."
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise InputError(f"--device {device!r}: an ONNX model runs on 'cpu' or 'cuda'")


def _metadata(path: Path, session: Any) -> dict[str, Any]:
    raw = session.get_modelmeta().custom_metadata_map
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise InputError(
            f"{path}: not an ONNX model written by cxrdist.export (its metadata lacks {', '.join(missing)}). "
            "Export the run with: python -m cxrdist.export RUN --out model.onnx"
        )
    meta = {}
    for key, text in raw.items():
        try:
            meta[key] = json.loads(text)
        except json.JSONDecodeError:
            raise InputError(f"{path}: metadata {key!r} is not JSON text; re-export the model") from None
    if meta["cxrdist_format"] != FORMAT:
        raise InputError(
            f"{path}: cxrdist_format is {meta['cxrdist_format']!r}, this cxrdist reads {FORMAT!r}. "
            "Re-export the model with this version, or use the cxrdist version that exported it."
        )
    return meta


def load_onnx(path: str | Path, device: str = "cpu", threads: int = 0) -> OnnxClassifier:
    """Open an exported model. `device`: "cpu" or "cuda" (needs onnxruntime-gpu); `threads`: onnxruntime's
    intra-op threads (0 = its default, one per physical core).

    Raises InputError for a missing file, a file onnxruntime cannot load, or an ONNX model that cxrdist
    did not export; CxrdistError when onnxruntime is not installed.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such ONNX model file")
    try:
        import onnxruntime as ort
    except ImportError:
        raise CxrdistError(
            "running an ONNX model needs onnxruntime: pip install 'cxrdist[onnx]' (or onnxruntime-gpu)"
        ) from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
    providers = _providers(device, ort.get_available_providers())
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) for bad files
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: onnxruntime cannot load it ({detail})") from None
    if providers[0] not in session.get_providers():  # onnxruntime falls back to the CPU without a word
        raise CxrdistError(
            f"--device {device}: onnxruntime could not start {providers[0]} (CUDA or cuDNN libraries "
            "missing?); it would run on the CPU. Use --device cpu, or fix the onnxruntime-gpu install."
        )
    meta = _metadata(path, session)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [INPUT_NAME] or OUTPUT_NAME not in [o.name for o in outputs]:
        raise InputError(
            f"{path}: expected one input {INPUT_NAME!r} and an output {OUTPUT_NAME!r}, found inputs "
            f"{[i.name for i in inputs]} and outputs {[o.name for o in outputs]}; re-export the model"
        )
    input_dtype = _ORT_INPUT_TYPES.get(inputs[0].type)
    if input_dtype != meta["input_dtype"]:
        raise InputError(
            f"{path}: its input is {inputs[0].type} but its metadata says {meta['input_dtype']}; re-export"
        )
    classes = check_classes(meta["classes"], f"{path} metadata")
    image_size = check_image_size(meta["image_size"], f"{path} metadata")
    input_shape, output_shape = inputs[0].shape, _output(outputs).shape
    if len(input_shape) != 4 or input_shape[1:] != [1, image_size, image_size]:
        raise MetadataError(
            f"{path}: its metadata says image_size {image_size} but the graph's input has shape "
            f"{input_shape}: the metadata does not belong to this graph; re-export the model"
        )
    if len(output_shape) != 2 or not isinstance(output_shape[1], int):
        raise MetadataError(f"{path}: the graph's output has shape {output_shape}, not (N, classes)")
    check_outputs(output_shape[1], classes, f"{path} metadata")
    return OnnxClassifier(
        path=path,
        classes=classes,
        image_size=image_size,
        input_dtype=input_dtype,
        model_name=str(meta["model_name"]),
        temperature=check_temperature(meta.get("temperature"), f"{path} metadata"),
        metadata=meta,
        session=session,
    )


def _output(outputs: list[Any]) -> Any:
    return next(o for o in outputs if o.name == OUTPUT_NAME)
