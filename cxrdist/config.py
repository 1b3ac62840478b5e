"""Typed run configuration: frozen dataclasses filled from a TOML recipe plus `--set key=value` overrides.

A recipe holds only what differs from the defaults below. Every key is checked: an unknown section or
key, a wrong type or a value outside its allowed set raises `ConfigError`, naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shard_tools.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(InputError):
    """A recipe or override is invalid. The message names the source, the key and what is allowed."""

    label = "config error"


def _choice(default: str, *choices: str) -> Any:
    return field(default=default, metadata={"choices": choices})


def _at_least(default: float, minimum: float) -> Any:
    return field(default=default, metadata={"min": minimum})


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"  # run directory: config, metrics, checkpoints, best model, plots
    seed: int = _at_least(0, 0)  # every random stream of the run derives from it (cxrdist.rng)
    keep_checkpoints: int = _at_least(2, 1)  # last K `checkpoints/epoch-NNNN` kept
    log_with: tuple[str, ...] = ()  # Accelerate trackers, e.g. ["tensorboard"]


@dataclass(frozen=True)
class DataConfig:
    # Folder or http(s) URL holding manifest.json, or "pipe:CMD": a shell command printing the manifest
    # (it runs as you, like any command you type; shard names from the manifest are checked and quoted).
    shards: str = ""
    num_workers: int = _at_least(2, 0)  # loader worker processes per rank
    shuffle_buffer: int = _at_least(2000, 0)  # samples per worker shuffle buffer
    cache: str = _choice("none", "none", "device")  # "device": whole split as uint8 on the device
    cache_max_gb: float = _at_least(4.0, 0.0)  # device cache is used only when the split fits this
    max_bad_samples: int = _at_least(0, 0)  # undecodable training samples tolerated (logged, skipped)
    verify_checksums: bool = False  # sha256 every local shard against the manifest before training
    # Lung-focus preprocessing against shortcuts in the frame (cxrdist.lungs.focus): "mask" greys out
    # everything outside the lung template, "crop" crops to it and resizes back. Recorded in best/meta.json
    # and applied by evaluate, predict, explain and the ONNX export, since the template needs no mask.
    lung_focus: str = _choice("off", "off", "mask", "crop")


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = True
    rotation_degrees: float = _at_least(10.0, 0.0)  # uniform in [-d, +d]
    hflip_prob: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    crop_scale: tuple[float, ...] = (1.0, 1.0)  # random-resized-crop area range [lo, hi]; [1, 1] = off
    brightness: float = _at_least(0.0, 0.0)  # multiplicative, uniform in [1-b, 1+b]
    contrast: float = _at_least(0.0, 0.0)  # around the image mean, uniform in [1-c, 1+c]
    # Border erasing against frame shortcuts: with this probability per sample, the frame (pixels within a
    # width drawn uniformly in border_erase_width, a fraction of the side, of any edge) is overwritten with
    # flat gray (the value normalisation maps to ~0) or uniform noise. 0 = off. Training only.
    border_erase: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    border_erase_width: tuple[float, ...] = (0.08, 0.16)  # [lo, hi], each edge; the audit hides 0.12
    border_erase_fill: str = _choice("flat", "flat", "noise")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet18"  # "seed_cnn" or any timm model name
    pretrained: bool = False  # ImageNet weights: from pretrained_file if set, else the hub
    pretrained_file: str = ""  # local .pth / .safetensors state dict (timm layout); head is replaced
    # Input channels: 1 (gray) or 3 (gray replicated, as the study). 0 = auto: 1 for seed_cnn, whose
    # unpadded first convolution computes exactly the same function on one channel (3x fewer
    # multiply-adds), 3 for timm models (padding makes replication matter; ImageNet stems expect 3).
    in_chans: int = field(default=0, metadata={"choices": (0, 1, 3)})
    drop_rate: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})


@dataclass(frozen=True)
class OptimConfig:
    name: str = _choice("adamw", "sgd", "adam", "adamw")
    lr: float = field(default=1e-3, metadata={"min": 0.0, "exclusive_min": True})  # peak LR (see below)
    # `lr` is tuned for a global batch of lr_base_batch images; on another global batch (more ranks) it is
    # scaled by lr_scaling: "linear", "sqrt", or "auto" (linear for SGD, sqrt for Adam/AdamW, as timm).
    # 0 = no scaling: lr is used as written. See cxrdist/optim.py.
    lr_base_batch: int = _at_least(0, 0)
    lr_scaling: str = _choice("auto", "auto", "linear", "sqrt")
    momentum: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})  # SGD only
    weight_decay: float = _at_least(0.0, 0.0)
    schedule: str = _choice("constant", "constant", "cosine")  # cosine is stepped per optimizer step
    warmup_epochs: float = _at_least(0.0, 0.0)  # linear warmup from 0, then the schedule
    min_lr_ratio: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})  # cosine floor / lr


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _at_least(10, 1)
    per_device_batch_size: int = _at_least(64, 1)  # images per rank per micro-step
    grad_accum_steps: int = _at_least(1, 1)
    # "auto": bf16 autocast where the device computes bf16 natively (CUDA compute capability 8+, CPUs with
    # AVX512-BF16 or AMX), else fp32. Elsewhere bf16 is emulated and slower than fp32.
    mixed_precision: str = _choice("auto", "auto", "no", "bf16", "fp16")
    loss: str = _choice("cross_entropy", "cross_entropy", "nll")  # nll: log_softmax + NLLLoss (study)
    label_smoothing: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    class_weights: bool = False  # inverse-frequency weights from the manifest's train counts
    grad_clip_norm: float = _at_least(0.0, 0.0)  # 0 = off
    # Memory format of activations. "auto": on for CUDA (tensor cores want NHWC); on a CPU only for
    # seed_cnn, where it was measured faster (1.7x; ResNet18 ran 0.8x: BENCHMARKS.md). Also true / false.
    channels_last: str = _choice("auto", "auto", "true", "false")
    compile: bool = False  # torch.compile the model
    ema_decay: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})  # 0 = no EMA
    best_metric: str = _choice("macro_f1", "macro_f1", "accuracy", "balanced_accuracy", "loss")
    patience: int = _at_least(0, 0)  # epochs without improvement before stopping; 0 = never
    eval_batch_size: int = _at_least(0, 0)  # 0 = 2 x per_device_batch_size


@dataclass(frozen=True)
class EvalConfig:
    """What the end of a run computes on the test split (README, "Reading the test metrics")."""

    bootstrap_resamples: int = _at_least(1000, 0)  # for the 95% intervals; 0 = no intervals
    calibrate: bool = True  # fit a temperature on the validation split, kept in best/meta.json
    tta: bool = False  # report test metrics with the mirrored image averaged in, beside the plain ones
    gradcam_per_class: int = _at_least(4, 0)  # Grad-CAM grid of test images per class; 0 = none


@dataclass(frozen=True)
class DistConfig:
    timeout_s: int = _at_least(600, 1)  # collective timeout: a dead rank fails the job after this


@dataclass(frozen=True)
class Config:
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    dist: DistConfig = DistConfig()


_SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_TYPES = typing.get_type_hints(Config)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"list of {typing.get_args(tp)[0].__name__}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` (as parsed from TOML) against the field type `tp`; return the typed value."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_tp, *_) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a {_type_name(tp)}, got {value!r}")
        return tuple(_coerce(v, item_tp, where) for v in value)
    if origin in (typing.Union, types.UnionType):  # pragma: no cover - no optional fields yet
        raise ConfigError(f"{where}: unsupported type {tp}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        if "\x00" in value:  # no path, name or URL holds one; the OS would refuse it much later
            raise ConfigError(f"{where}: contains a NUL character: {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover


def _check_bounds(value: Any, meta: typing.Mapping[str, Any], where: str) -> None:
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(f"{where}: {value!r} is not one of {allowed}")
    if "min" in meta:
        low_ok = value > meta["min"] if meta.get("exclusive_min") else value >= meta["min"]
        if not low_ok:
            op = ">" if meta.get("exclusive_min") else ">="
            raise ConfigError(f"{where}: must be {op} {meta['min']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{where}: must be <= {meta['max']}, got {value!r}")


def _check_augment(cfg: AugmentConfig, source: str) -> None:
    lo_hi = cfg.crop_scale
    if len(lo_hi) != 2 or not 0.0 < lo_hi[0] <= lo_hi[1] <= 1.0:
        raise ConfigError(
            f"{source}: [augment] crop_scale: must be [lo, hi] with 0 < lo <= hi <= 1 (area fractions; "
            f"[1.0, 1.0] = no crop), got {list(lo_hi)}"
        )
    width = cfg.border_erase_width
    if len(width) != 2 or not 0.0 < width[0] <= width[1] < 0.5:
        raise ConfigError(
            f"{source}: [augment] border_erase_width: must be [lo, hi] with 0 < lo <= hi < 0.5 (fractions "
            f"of the side, on each edge), got {list(width)}"
        )


# Checks that involve more than one value of a key, run once the section is built.
_SECTION_CHECKS = {"augment": _check_augment}


def _build_section(cls: type, values: dict[str, Any], source: str, section: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = f"{source}: [{section}] {key}"
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown key '{section}.{key}'. Allowed in [{section}]: {allowed}")
        if isinstance(value, bool) and {"true", "false"} <= set(fields[key].metadata.get("choices", ())):
            value = "true" if value else "false"  # a tri-state key takes TOML's true / false as well
        typed = _coerce(value, hints[key], where)
        _check_bounds(typed, fields[key].metadata, where)
        kwargs[key] = typed
    built = cls(**kwargs)
    if section in _SECTION_CHECKS:
        _SECTION_CHECKS[section](built, source)
    return built


def _parse_override(item: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value). The value is read as TOML, else taken as a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.epochs=2")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.epochs=2")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings such as paths and "bf16" need no quotes on the command line
    return parts[0], parts[1], value


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Build a `Config` from nested dicts (as TOML parses them). Raises `ConfigError`."""
    sections = {}
    for name, values in data.items():
        if name not in _SECTIONS:
            allowed = ", ".join(_SECTIONS)
            raise ConfigError(f"{source}: unknown section [{name}]. Allowed sections: {allowed}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{name}] must be a table of key = value lines, got {values!r}")
        sections[name] = _build_section(_SECTION_TYPES[name], values, source, name)
    return Config(**sections)


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a TOML recipe (or only defaults when `path` is None) and apply `--set` overrides."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{source}: recipe not found. See recipes/ for the shipped ones.") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source}: not valid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:  # a directory, no permission
            raise ConfigError(f"{source}: cannot read the recipe: {e.strerror or e}") from None
    for item in overrides:
        section, key, value = _parse_override(item)
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{section}] must be a table, cannot override {section}.{key}")
        table[key] = value
    return config_from_dict(data, source if not overrides else f"{source} (with --set overrides)")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) ready for TOML or JSON."""

    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return {
        section: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, section)).items()}
        for section in _SECTIONS
    }
