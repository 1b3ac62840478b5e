"""Grad-CAM: where does the model look? An audit for shortcut learning.

    python -m cxrdist.explain RUN_OR_MODEL [IMAGE_OR_DIR...] --out DIR [--shards DIR_OR_URL --per-class N]
                              [--force]

Models trained on this database are known to learn hospital markers, text and borders instead of lung
findings (DeGrave et al., Nature Machine Intelligence 2021). For each image this writes the radiograph with
its Grad-CAM heat map overlaid (for the predicted class), and reports the share of heat-map mass that lies
outside a central lung box. With `--shards` it also writes a grid of N test images per class and the mean
outside share per true class. A high share is no proof of a shortcut, and a low one no proof of its
absence, but a class whose maps sit on corners and edges deserves a look.

Files that `--out` already holds (training's own grid in RUN/gradcam/, an earlier explain) are replaced
only with `--force`; other files there are never touched.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from rich.console import Console
from rich.table import Table

from cxrdist.artifacts import load_trained_model
from cxrdist.augment import eval_transform
from cxrdist.cli import (
    add_device,
    add_inputs,
    add_model,
    check_writable_file,
    find_images,
    refuse_existing,
    resolve_device,
)
from cxrdist.data import eval_batches, read_manifest
from cxrdist.evaluate import check_compatible
from cxrdist.lungs import focus, template_mask
from cxrdist.models import gradcam_target_layer
from cxrdist.rundir import EXPLAIN_SUMMARY
from shard_tools.cli import positive_int, print_problem, run_main, stdout_console
from shard_tools.errors import EXIT_FAILED, EXIT_OK, InputError
from shard_tools.files import atomic_write_bytes, atomic_write_json
from shard_tools.images import ImageError, load_gray
from shard_tools.locks import output_lock

# Central box that holds both lung fields on a PA radiograph, as fractions of width and height
# (x0, y0, x1, y1). Deliberately generous: mass outside it sits on borders, corners, labels and the neck.
LUNG_BOX = (0.12, 0.08, 0.88, 0.92)


def grad_cam(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor | None = None):
    """Grad-CAM maps for a batch.

    Args:
        model: eval-mode classifier returning logits (B, K).
        x: normalised input (B, C, H, W).
        target: class per sample (B,) to explain; None explains the predicted class.
    Returns:
        (cams float (B, H, W) in [0, 1] at input resolution, probs float (B, K)).
    """
    layer = gradcam_target_layer(model)
    store: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        store["act"] = output

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # makes the activations part of the graph
            logits = model(x).float()
            if target is None:
                target = logits.argmax(1)
            score = logits.gather(1, target[:, None]).sum()
            # Gradients for the activations only: the model's own .grad fields stay untouched.
            (grad,) = torch.autograd.grad(score, store["act"])
    finally:
        handle.remove()
    act, grad = store["act"].detach().float(), grad.float()  # (B, C', h, w)
    weights = grad.mean(dim=(2, 3), keepdim=True)  # global-average-pooled gradients per channel
    cam = F.relu((weights * act).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return (cam / peak).cpu(), logits.detach().softmax(1).cpu()


def outside_share(cam: np.ndarray, box: Sequence[float] = LUNG_BOX) -> float:
    """Fraction of the heat map's total mass that lies outside the central lung box."""
    h, w = cam.shape
    x0, y0, x1, y1 = round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)
    total = float(cam.sum())
    if total <= 0:
        return 0.0
    return 1.0 - float(cam[y0:y1, x0:x1].sum()) / total


def inside_share(cam: np.ndarray, lungs: np.ndarray) -> float | None:
    """Fraction of the heat map's total mass on the lung fields (`lungs`: bool (H, W)); None for an empty
    map."""
    total = float(cam.sum())
    return float(cam[lungs].sum()) / total if total > 0 else None


def lung_fields(masks: torch.Tensor | None, size: int, lung_focus: str) -> np.ndarray:
    """bool (B, H, W) lung fields as the model saw them: each image's mask (bool (B, 1, H, W)) or, without
    one, the template, both through the model's lung-focus preprocessing (a "crop" moves the fields)."""
    if masks is None:
        masks = template_mask(size, size)[None, None]
    fields = focus(masks.to(torch.uint8) * 255, lung_focus) >= 128  # outside "mask" focus: FILL < 128
    return fields[:, 0].cpu().numpy()


def _jet(v: np.ndarray) -> np.ndarray:
    """Map [0, 1] to RGB uint8 with the classic jet colormap (no matplotlib needed)."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def overlay(gray: np.ndarray, cam: np.ndarray, caption: str = "", alpha: float = 0.45) -> Image.Image:
    """Radiograph (uint8 H x W) under its heat map, with the lung box outlined and a caption."""
    base = np.repeat(gray[..., None].astype(np.float32), 3, axis=2)
    heat = _jet(cam).astype(np.float32)
    weight = alpha * cam[..., None]  # cold regions keep the radiograph readable
    img = Image.fromarray((base * (1 - weight) + heat * weight).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    h, w = gray.shape
    box = (LUNG_BOX[0] * w, LUNG_BOX[1] * h, LUNG_BOX[2] * w, LUNG_BOX[3] * h)
    draw.rectangle(box, outline=(255, 255, 255))
    if caption:
        draw.rectangle((0, 0, w, 11), fill=(0, 0, 0))
        draw.text((2, 0), caption, fill=(255, 255, 255))
    return img


GRID_TILE_PX = 224  # each grid image, scaled to this: legible at the report's width, 6 to a row
GRID_FONT_PX = 15
WRONG = (176, 0, 0)  # the predicted class in red when it is not the true one


def _fit(text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def grid_image(rows: list[tuple[str, list[tuple[Image.Image, str]]]]) -> Image.Image:
    """The Grad-CAM grid: one row per true class (`rows`: class name, then (overlay, predicted class) per
    image), each overlay scaled to GRID_TILE_PX with two caption lines under it: the true class and the
    class the model predicted (red when wrong). Names are written whole, cut only if wider than a tile."""
    font = ImageFont.load_default(size=GRID_FONT_PX)
    gap, line = 6, GRID_FONT_PX + 4
    cell_w, cell_h = GRID_TILE_PX + gap, GRID_TILE_PX + 2 * line + gap
    columns = max([len(tiles) for _, tiles in rows] + [1])
    grid = Image.new("RGB", (columns * cell_w + gap, len(rows) * cell_h + gap), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (true, tiles) in enumerate(rows):
        y = gap + r * cell_h
        if not tiles:
            empty = f"no {true} image in the split"
            draw.text((gap, y + GRID_TILE_PX // 2), empty, fill=(90, 90, 90), font=font)
        for j, (img, predicted) in enumerate(tiles):
            x = gap + j * cell_w
            grid.paste(img.resize((GRID_TILE_PX, GRID_TILE_PX), Image.Resampling.BILINEAR), (x, y))
            ty = y + GRID_TILE_PX + 2
            draw.text((x, ty), _fit(f"true: {true}", font, GRID_TILE_PX), fill=(20, 20, 20), font=font)
            colour = (20, 20, 20) if predicted == true else WRONG
            draw.text((x, ty + line), _fit(f"model: {predicted}", font, GRID_TILE_PX), fill=colour, font=font)
    return grid


def _save_png(img: Image.Image, path: Path) -> None:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def overlay_path(out: Path, image: Path) -> Path:
    """Where `explain_files` writes the overlay of `image`."""
    return out / f"{image.stem}_gradcam.png"


def grid_path(out: Path, split: str) -> Path:
    """Where `explain_shards` writes its grid of `split`."""
    return out / f"gradcam_grid_{split}.png"


def explain_files(model, meta, files: list[Path], out: Path, device, batch_size: int = 16) -> list[dict]:
    """One overlay PNG per readable file (`out/<stem>_gradcam.png`); returns a record per file."""
    records = []
    for i in range(0, len(files), batch_size):
        chunk, grays = [], []
        for path in files[i : i + batch_size]:
            try:
                grays.append(load_gray(path, meta.image_size))
                chunk.append(path)
            except ImageError as e:
                records.append({"path": str(path), "error": e.reason})
        if not chunk:
            continue
        images = focus(torch.from_numpy(np.stack(grays)).unsqueeze(1).to(device), meta.lung_focus)
        grays = list(images[:, 0].cpu().numpy())  # the overlay shows what the model saw
        cams, probs = grad_cam(model, eval_transform(images, meta.in_chans))
        for path, gray, cam, p in zip(chunk, grays, cams.numpy(), probs.numpy(), strict=True):
            pred = meta.classes[int(p.argmax())]
            share = outside_share(cam)
            target = overlay_path(out, path)
            _save_png(overlay(gray, cam, f"{pred} {p.max():.2f}"), target)
            records.append(
                {"path": str(path), "predicted": pred, "outside_share": share, "overlay": str(target)}
            )
    return records


def explain_shards(model, meta, shards: str, out: Path, per_class: int, split: str, device) -> dict:
    """Grid of `per_class` images per true class from a split, and the mean outside share per class."""
    manifest = read_manifest(shards)
    check_compatible(meta, manifest)
    k = len(manifest.classes)
    picked: dict[int, list[tuple[np.ndarray, str]]] = {c: [] for c in range(k)}
    lungs: dict[int, list[torch.Tensor]] = {c: [] for c in range(k)}  # each image's mask, if any
    for images, labels, keys, *masks in eval_batches(
        manifest, split, batch_size=64, rank=0, world_size=1, num_workers=0, masks=manifest.has_masks
    ):
        for i, (img, label, key) in enumerate(zip(images, labels.tolist(), keys, strict=True)):
            if len(picked[label]) < per_class:
                picked[label].append((img[0].numpy(), key))
                if masks:
                    lungs[label].append(masks[0][i])
        if all(len(v) >= per_class for v in picked.values()):
            break
    rows = [(name, []) for name in manifest.classes]  # the grid: (overlay, predicted) per true class
    summary: dict[str, dict] = {}
    for c in range(k):
        if not picked[c]:
            summary[manifest.classes[c]] = {
                "images": 0,
                "mean_outside_share": None,
                "mean_inside_share": None,
                "accuracy": None,
            }
            continue
        stored = torch.from_numpy(np.stack([g for g, _ in picked[c]])).unsqueeze(1).to(device)
        images = focus(stored, meta.lung_focus)
        grays = images[:, 0].cpu().numpy()  # the overlay shows what the model saw
        x = eval_transform(images, meta.in_chans)
        cams, probs = grad_cam(model, x)
        shares, inside, correct = [], [], 0
        fields = lung_fields(torch.stack(lungs[c]) if lungs[c] else None, meta.image_size, meta.lung_focus)
        for j, (gray, cam, p) in enumerate(zip(grays, cams.numpy(), probs.numpy(), strict=True)):
            pred = int(p.argmax())
            correct += pred == c
            shares.append(outside_share(cam))
            inside.append(inside_share(cam, fields[j if lungs[c] else 0]))
            rows[c][1].append((overlay(gray, cam), manifest.classes[pred]))
        summary[manifest.classes[c]] = {
            "images": len(shares),
            "mean_outside_share": float(np.mean(shares)),
            # on the lung fields: each image's mask when the shards carry masks, else the template
            "mean_inside_share": _mean([v for v in inside if v is not None]),
            "accuracy": correct / len(shares),
        }
    grid_file = grid_path(out, split)
    _save_png(grid_image(rows), grid_file)
    region = "mask" if manifest.has_masks else "template"
    return {
        "grid": str(grid_file),
        "split": split,
        "lung_box": list(LUNG_BOX),
        "region": region,  # where mean_inside_share counts the heat map's mass
        "per_class": summary,
    }


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def print_summary(summary: dict, console: Console) -> None:
    table = Table(title="Grad-CAM: heat-map mass outside the central lung box", title_justify="left")
    for col in ("true class", "images", "mean outside share", "accuracy"):
        table.add_column(col, justify="left" if col == "true class" else "right")
    for name, row in summary["per_class"].items():
        share = "-" if row["mean_outside_share"] is None else f"{row['mean_outside_share']:.1%}"
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.1%}"
        table.add_row(name, str(row["images"]), share, acc)
    console.print(table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cxrdist.explain", description="Grad-CAM heat maps and a shortcut indicator."
    )
    add_model(p)
    add_inputs(p, required=False)
    p.add_argument("--out", type=Path, required=True, help="directory for the overlays, grid and summary")
    p.add_argument("--shards", help="also draw a grid of test images per class from these shards")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--per-class", type=positive_int, default=6, help="grid images per class (with --shards)")
    p.add_argument(
        "--force", action="store_true", help="replace files of an earlier run in --out (else: refused)"
    )
    add_device(p)
    return p.parse_args(argv)


def planned_outputs(out: Path, files: list[Path], split: str | None) -> list[Path]:
    """Every file this explain writes (`split`: the grid's, None without --shards). Two images with one
    name would write one overlay: refused, as the second would silently replace the first."""
    overlays: dict[Path, Path] = {}
    for image in files:
        target = overlay_path(out, image)
        if target in overlays:
            raise InputError(
                f"{overlays[target]} and {image} would both be drawn to {target}; explain them with "
                "different --out folders"
            )
        overlays[target] = image
    return [out / EXPLAIN_SUMMARY, *overlays, *([grid_path(out, split)] if split else [])]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with output_lock(args.out, f"explain --out {args.out}"):  # one writer per folder (shard_tools.locks)
        return explain_main(args)


def explain_main(args: argparse.Namespace) -> int:
    console = stdout_console()
    if not args.inputs and not args.shards:
        raise InputError("give images or folders to explain, or --shards for a per-class grid")
    files, missing = find_images(args.inputs)
    # No-clobber: `--out runs/x/gradcam` holds training's grid; replaced only when asked.
    refuse_existing(planned_outputs(args.out, files, args.split if args.shards else None), args.force)
    check_writable_file(args.out / EXPLAIN_SUMMARY, "--out")  # before any work
    device = resolve_device(args.device)
    model, meta = load_trained_model(args.model, device)
    result: dict = {"model": args.model}
    failures = 0
    if args.inputs:
        records = explain_files(model, meta, files, args.out, device)
        records += [{"path": item, "error": reason} for item, reason in missing]
        for r in records:
            if "error" in r:
                failures += 1
                print_problem(f"{r['path']}: {r['error']}", "skipped", "yellow")
            else:
                console.print(f"{r['overlay']}  {r['predicted']}  outside box {r['outside_share']:.1%}")
        result["images"] = records
    if args.shards:
        result["shards"] = explain_shards(
            model, meta, args.shards, args.out, args.per_class, args.split, device
        )
        print_summary(result["shards"], console)
        console.print(f"grid: {result['shards']['grid']}")
    atomic_write_json(args.out / EXPLAIN_SUMMARY, result)
    return EXIT_FAILED if failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(run_main(main))
