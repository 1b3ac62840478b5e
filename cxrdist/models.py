"""Models: the study's `seed_cnn`, or any timm model, from scratch or with ImageNet weights.

Contract: input float32 (B, in_chans, H, W), normalised as `cxrdist.augment.normalize_stats(in_chans)`;
output float logits (B, num_classes).

ImageNet weights come from a local file (`model.pretrained_file`: a timm-layout state dict as .pth/.pt or
.safetensors) or from the Hugging Face hub (timm's default). Either way the classifier head is new and
`in_chans=1` folds the RGB stem by summing it over its input channels (timm's `adapt_input_conv`).
Without a network the hub path fails at once with a message saying what to do, instead of timm's
download retries.
"""

from __future__ import annotations

import difflib
import os
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cxrdist.config import ModelConfig
from shard_tools.errors import InputError

__all__ = [
    "SEED_CNN_INPUT_PX",
    "fold_rgb_stem",
    "input_channels",
    "ModelError",
    "SeedCNN",
    "check_input_size",
    "create_model",
    "gradcam_target_layer",
    "num_parameters",
    "seed_cnn",
]

# Input sizes for which seed_cnn's feature map is 1x1, so that it flattens to exactly 16 features.
SEED_CNN_INPUT_PX = (100, 163)
HUB_PROBE_TIMEOUT_S = 1.0


class ModelError(InputError):
    """A model cannot be built as configured. The message names the setting and what to do."""


class SeedCNN(nn.Module):
    """The study's network for 128x128 inputs, layer for layer.

    Shapes at 128 px::

        (B, 3, 128, 128)  conv 5x5 -> (B, 6, 124, 124)  max-pool 8 -> (B, 6, 15, 15)
                          conv 5x5 -> (B, 16, 11, 11)   max-pool 8 -> (B, 16, 1, 1)  flatten -> (B, 16)
        -> Linear(16, 100) -> ReLU -> Linear(100, 50) -> ReLU -> Linear(50, num_classes)

    So the 16 features are the 16 channels of the second convolution, each reduced to the maximum over
    the top-left 8x8 window of its 11x11 map (a stride-8 pool floors away the last 3 rows and columns,
    as the first pool drops the last 4 of 124). Inputs from 100 to 163 px (`SEED_CNN_INPUT_PX`) also give
    a 1x1 map; the study used 128. Other sizes raise `ModelError` in `forward`.
    """

    def __init__(self, num_classes: int = 4, in_chans: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 6, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=8, stride=8),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),  # index 4: the Grad-CAM layer (last map with spatial extent, 11x11 at 128 px)
            nn.MaxPool2d(kernel_size=8, stride=8),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16, 100),
            nn.ReLU(),
            nn.Linear(100, 50),
            nn.ReLU(),
            nn.Linear(50, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        size = tuple(x.shape[-2:])
        x = self.features(x)  # (B, 16, 1, 1) for inputs of SEED_CNN_INPUT_PX
        if x.shape[-2:] != (1, 1):
            lo, hi = SEED_CNN_INPUT_PX
            raise ModelError(
                f"seed_cnn needs {lo}..{hi} px inputs (the study used 128) so that its features flatten to"
                f" 16; got {size[0]}x{size[1]}. Use shards packed at 128 px for seed_cnn."
            )
        return self.classifier(torch.flatten(x, 1))  # (B, num_classes)


def seed_cnn(num_classes: int = 4, in_chans: int = 1) -> nn.Module:
    """The study's CNN. `in_chans=1` gives Conv2d(1, 6, 5), the same function as the study's Conv2d(3, 6, 5)
    on gray replicated to RGB (`fold_rgb_stem`) at a third of the cost; `in_chans=3` is the study's layer."""
    return SeedCNN(num_classes=num_classes, in_chans=in_chans)


def input_channels(cfg: ModelConfig) -> int:
    """`model.in_chans` with 0 ("auto") resolved: 1 for seed_cnn (exact, see `fold_rgb_stem`), 3 otherwise."""
    if cfg.in_chans:
        return cfg.in_chans
    return 1 if cfg.name == "seed_cnn" else 3


def fold_rgb_stem(
    weight: Tensor,
    bias: Tensor,
    rgb_stats: tuple[tuple[float, ...], tuple[float, ...]],
    gray_stats: tuple[tuple[float, ...], tuple[float, ...]],
) -> tuple[Tensor, Tensor]:
    """A first convolution over gray replicated to 3 channels, as one over the gray channel alone.

    The 3-channel layer sees ``y_c = (x - m_c) / s_c`` for gray x in [0, 1]; the 1-channel one sees
    ``z = (x - m) / s``. Since ``y_c = (s z + m - m_c) / s_c``, the layer ``sum_c W_c * y_c + b`` equals
    ``W' * z + b'`` with ``W' = sum_c (s / s_c) W_c`` and ``b' = b + sum_c ((m - m_c) / s_c) sum(W_c)``:
    exact (up to float rounding) for a convolution without padding, as seed_cnn's are; with zero padding
    the border would differ, which is why timm models keep 3 channels.

    Args:
        weight: (out, 3, kh, kw); bias: (out,); rgb_stats: ((m_r, m_g, m_b), (s_r, s_g, s_b));
        gray_stats: ((m,), (s,)) as `cxrdist.augment.normalize_stats(1)`.
    Returns:
        (weight (out, 1, kh, kw), bias (out,)).
    """
    (rgb_mean, rgb_std), ((m,), (s,)) = rgb_stats, gray_stats
    w = weight.double()
    scale = torch.tensor([s / sc for sc in rgb_std], dtype=torch.float64).view(1, 3, 1, 1)
    shift = torch.tensor([(m - mc) / sc for mc, sc in zip(rgb_mean, rgb_std)], dtype=torch.float64)
    folded_w = (w * scale).sum(1, keepdim=True)
    folded_b = bias.double() + (w.sum((2, 3)) * shift.view(1, 3)).sum(1)
    return folded_w.to(weight.dtype), folded_b.to(bias.dtype)


def check_input_size(model_name: str, image_size_px: int) -> None:
    """Raise `ModelError` if `model_name` cannot take square `image_size_px` inputs; else return None.

    seed_cnn: `SEED_CNN_INPUT_PX`. timm models: a fixed input size (e.g. ViTs) or a minimum size declared
    in the model's pretrained config. Call it before training, with the manifest's image size.
    """
    if model_name == "seed_cnn":
        lo, hi = SEED_CNN_INPUT_PX
        if not lo <= image_size_px <= hi:
            raise ModelError(
                f"seed_cnn needs {lo}..{hi} px images (the study used 128), the shards hold"
                f" {image_size_px} px. Pack shards with --size 128, or choose another model.name."
            )
        return
    pcfg = _pretrained_cfg(model_name)
    if pcfg is None:
        return
    size = pcfg.input_size[-1]
    if pcfg.fixed_input_size and image_size_px != size:
        raise ModelError(
            f"{model_name} takes only {size}x{size} inputs, the shards hold {image_size_px} px."
            f" Pack shards at {size} px, or choose a model without a fixed input size."
        )
    if pcfg.min_input_size and image_size_px < pcfg.min_input_size[-1]:
        raise ModelError(
            f"{model_name} needs inputs of at least {pcfg.min_input_size[-1]} px, the shards hold"
            f" {image_size_px} px."
        )


def create_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Build `cfg.name` with a fresh `num_classes` head, weights as configured. Raises `ModelError`.

    - "seed_cnn": the study's network (no pretrained weights, no dropout).
    - a timm name (`timm.list_models()`), optionally with a weight tag ("resnet18.a1_in1k"), or
      "hf-hub:org/repo": from scratch, or with `cfg.pretrained` its ImageNet weights, read from
      `cfg.pretrained_file` when set (checked to cover every backbone tensor, and nothing else), else
      from the local Hugging Face cache, else downloaded. `cfg.pretrained_file` is ignored when
      `cfg.pretrained` is false.
    """
    in_chans = input_channels(cfg)
    if cfg.name == "seed_cnn":
        if cfg.pretrained:
            raise ModelError("seed_cnn has no pretrained weights: set model.pretrained = false")
        if cfg.drop_rate > 0:
            raise ModelError(
                "seed_cnn is the study's exact network, without dropout: set model.drop_rate = 0"
            )
        return seed_cnn(num_classes=num_classes, in_chans=in_chans)

    import timm  # here, not at the top: seed_cnn runs never pay for importing timm's model zoo

    from_hub_repo = cfg.name.startswith(("hf-hub:", "hf_hub:"))
    if not from_hub_repo and not timm.is_model(cfg.name):
        close = difflib.get_close_matches(cfg.name, timm.list_models(), n=5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ModelError(
            f"model.name = {cfg.name!r} is neither 'seed_cnn' nor a timm model.{hint} List timm's models"
            f" with: python -c \"import timm; print(timm.list_models('resnet*'))\""
        )
    _pretrained_cfg(cfg.name)  # an unknown weight tag fails here, with the known ones listed
    if from_hub_repo and not _hub_offline() and not _reachable(_hub_endpoint()):
        raise ModelError(
            f"model.name = {cfg.name!r} is read from the Hugging Face hub, which cannot be reached (no"
            f" connection within {HUB_PROBE_TIMEOUT_S:g} s). Use a timm model name (and"
            f" model.pretrained_file for weights), or run once online, then set HF_HUB_OFFLINE=1."
        )
    kwargs: dict[str, Any] = {
        "num_classes": num_classes,
        "in_chans": in_chans,
        "drop_rate": cfg.drop_rate,
    }
    if not cfg.pretrained:
        return timm.create_model(cfg.name, pretrained=False, **kwargs)
    if cfg.pretrained_file:
        return _from_file(cfg.name, Path(cfg.pretrained_file), kwargs)
    if from_hub_repo:
        return _download(cfg.name, kwargs)
    return _from_hub(cfg.name, kwargs)


def _from_file(name: str, path: Path, kwargs: dict[str, Any]) -> nn.Module:
    """timm loads the file (head dropped, stem folded for in_chans=1); we check that it fitted."""
    import timm

    where = f"model.pretrained_file = {str(path)!r}"
    if not path.is_file():
        raise ModelError(f"{where}: no such file")
    try:
        # The loader timm itself uses: safetensors for .safetensors, else torch.load(weights_only=True),
        # unwrapping {"state_dict": ...} / {"model": ...} checkpoints.
        file_sd = timm.models.load_state_dict(str(path))
    except Exception as e:
        raise ModelError(
            f"{where}: cannot read a state dict ({type(e).__name__}: {e}). Expected a timm-layout state"
            f" dict saved with torch.save (.pth/.pt) or safetensors (.safetensors)."
        ) from e
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    except RuntimeError as e:  # tensor shape mismatches
        raise ModelError(f"{where} does not fit {name}: {e}") from e
    _check_covers(model, file_sd, name, where)
    return model


def _check_covers(model: nn.Module, file_sd: dict[str, Any], name: str, where: str) -> None:
    """timm loads pretrained weights non-strictly once the head changes; make missing or extra keys loud.

    Missing keys would leave layers at random init; extra keys mean another architecture (a resnet34 file
    loads into resnet18 without a single shape error).
    """
    classifier = model.pretrained_cfg.get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)

    def is_head(key: str) -> bool:
        return any(key.startswith(h + ".") for h in heads)

    model_keys = {k for k in model.state_dict() if not is_head(k) and not k.endswith("num_batches_tracked")}
    file_keys = {k for k in file_sd if not is_head(k) and not k.endswith("num_batches_tracked")}
    missing, extra = sorted(model_keys - file_keys), sorted(file_keys - model_keys)
    problems = []
    if missing:
        problems.append(f"it lacks {len(missing)} of the model's tensors (e.g. {', '.join(missing[:3])})")
    if extra:
        problems.append(f"it has {len(extra)} tensors the model does not (e.g. {', '.join(extra[:3])})")
    if problems:
        raise ModelError(f"{where} is not a timm {name!r} state dict: {'; '.join(problems)}")


def _from_hub(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """timm's default weights for `name`: from the local cache if there, else downloaded."""
    pcfg = _pretrained_cfg(name)
    if pcfg is None or not (pcfg.hf_hub_id or pcfg.url):
        raise ModelError(
            f"timm has no pretrained weights for {name!r}: set model.pretrained = false, or"
            f" model.pretrained_file to a local state dict"
        )
    import timm

    cached = _cached_weights(pcfg)
    if cached and not pcfg.custom_load:
        # Read the cached file directly: no hub request at all, so no timeouts offline.
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs)
    _require_hub(name, _weights_endpoint(pcfg))
    return _download(name, kwargs)


def _download(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:
        raise ModelError(
            f"downloading ImageNet weights for {name!r} failed ({type(e).__name__}: {e}). Pass a"
            f" local .safetensors/.pth state dict instead: --set model.pretrained_file=PATH"
        ) from e


def _pretrained_cfg(name: str) -> Any:
    """timm's PretrainedCfg for a (tagged) model name; None for unknown and "hf-hub:" names."""
    import timm

    try:
        return timm.models.get_pretrained_cfg(name)
    except RuntimeError as e:  # a known architecture with an unknown weight tag: "resnet18.nope"
        tags = timm.list_pretrained(name.split(".")[0] + ".*")
        raise ModelError(f"model.name = {name!r}: {e} Its tags: {', '.join(tags) or 'none'}") from None


def _cached_weights(pcfg: Any) -> str | None:
    """Path of the model's weights in the local Hugging Face cache (or timm's old torch-hub cache)."""
    from huggingface_hub import try_to_load_from_cache

    if pcfg.hf_hub_id:
        repo, _, revision = pcfg.hf_hub_id.partition("@")
        # The files timm would fetch, in its order: a .safetensors alternative first, then the pickle.
        filename = pcfg.hf_hub_filename or "pytorch_model.bin"
        names = [filename]
        if filename.endswith(".bin"):
            names.insert(0, filename[: -len(".bin")].replace("pytorch_model", "model") + ".safetensors")
        for filename in names:
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return found
    if pcfg.url:
        old = (
            Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(pcfg.url).path)
        )
        if old.is_file():
            return str(old)
    return None


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _weights_endpoint(pcfg: Any) -> str:
    """Where timm would download from: the hub, or (old weights only) a plain URL."""
    if not pcfg.hf_hub_id and pcfg.url:
        return pcfg.url
    return _hub_endpoint()


def _hub_offline() -> bool:
    from huggingface_hub import constants

    # constants reads the variable once at import; a later export (or a test) must count too.
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _reachable(url: str, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to `url`'s host (or its proxy) within `timeout_s`?

    The connect runs in a daemon thread because a DNS lookup inside `socket.create_connection` ignores
    the socket timeout and can hang for many seconds on a machine without a resolver.
    """
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname or "", proxy_parts.port or 8080
    ok: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.25)
    return bool(ok)


def _require_hub(name: str, url: str) -> None:
    """Fail within about a second, with what to do, when `name`'s weights cannot be downloaded."""
    todo = (
        "Save them once where there is network (README, 'Pretrained weights offline') and pass the file:"
        f" --set model.pretrained_file=weights/{name}.safetensors (a timm-layout .safetensors/.pth state"
        " dict), or run once with network access to fill the Hugging Face cache."
    )
    if _hub_offline():
        raise ModelError(
            f"model.pretrained: the weights of {name!r} are not in the local cache and HF_HUB_OFFLINE is"
            f" set. {todo}"
        )
    if not _reachable(url):
        host = urllib.parse.urlsplit(url).hostname
        raise ModelError(
            f"model.pretrained: the weights of {name!r} are not in the local cache and {host} cannot be"
            f" reached (no connection within {HUB_PROBE_TIMEOUT_S:g} s). {todo}"
        )


def gradcam_target_layer(model: nn.Module) -> nn.Module:
    """The layer whose activations and gradients Grad-CAM uses.

    seed_cnn: the ReLU after the second convolution (16 x 11 x 11 at 128 px; after the pool it is 1x1).
    timm ResNets: `layer4`, the last stage. Others: the last `nn.Conv2d` (for ViTs that is the patch
    embedding, which makes a poor CAM). Pass the unwrapped model (not DDP); torch.compile is unwrapped.
    """
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, SeedCNN):
        return model.features[4]
    layer4 = getattr(model, "layer4", None)
    if isinstance(layer4, nn.Module):
        return layer4
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ModelError(f"{type(model).__name__} has no Conv2d layer to take a Grad-CAM from")
    return convs[-1]


def num_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not."""
    return sum(p.numel() for p in model.parameters())
