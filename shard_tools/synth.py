"""Synthetic chest radiographs in the database's layout: the built-in default dataset and the test fixture.

    python -m shard_tools.synth OUT [--per-class N] [--size PX] [--seed K] [--workers W] [--masks]
        [--shortcut none|corner] [--force]

writes ``OUT/<Class>/images/<Class>-<i>.png`` (i = 1..N, as in the database), 8-bit grayscale,
``size x size`` pixels, for the four classes of `schema.CLASSES`. With ``--masks`` it also writes each
image's lung mask as the database does, ``OUT/<Class>/masks/<Class>-<i>.png``: 8-bit gray, same size,
255 = lung field, 0 = not lung (the lung fields drawn below where the heart shadow does not cover them,
thresholded at half, as the database's masks leave the heart out). `shard_tools.pack` stores them beside
the images.

Each image is drawn procedurally after anatomy: body silhouette, two lung fields (dark: air), ribs and
clavicles, spine, the heart shadow and the diaphragm domes, with faint vascular markings. Each class adds
its own kind of opacity (bright: denser tissue) inside the lungs:

- COVID: bilateral, peripheral, lower-zone patchy haze (ground glass);
- Lung_Opacity: one focal lobar patch, dense, with one edge cut straight as if by a fissure;
- Viral Pneumonia: a diffuse interstitial (reticular) net, on a smaller, paediatric chest;
- Normal: clear lungs.

Position, scale, rotation, opacity strength, exposure, contrast and noise are jittered, and some opacities
are faint, so the classes are learnable but not trivially separable. Burned-in corner markers ("L"/"R",
text boxes) appear at random, drawn from a stream independent of the class, so they carry no label
information (in the real database they do; a model here cannot learn that shortcut).

``--shortcut corner`` plants a known shortcut instead, for testing audits: a white (255) filled square in
the top border, outside the lungs, whose position along the edge is set by the class. Class k (its index in
`schema.CLASSES`) gets the square at x = 3% + 12% k of the width, y = 3% of the height, side 6%
(`shortcut_box`); every image of the class has it, so a model can score perfectly from the frame alone.
The squares lie in the left half and within the top 12% (`cxrdist.lungs.BORDER_FRACTION`), so a model
that sees only the border, and the study CNN that never sees the right and bottom fifth, both see them.
The lungs and all other pixels are the same as without it: the default (``none``) writes the same images
as before the option existed.

Every image depends only on (seed, class, i), so the output is the same for any number of workers.
OUT is written in a hidden folder beside it and swapped in at the end (`shard_tools.files`); `--force`
replaces only an empty folder or an earlier synth output (`<Class>/images/<Class>-<i>.png` and nothing
else; `shard_tools.outdir`). Exit codes: 0 done, 1 writing failed (disk full), 2 bad options or OUT.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from shard_tools.cli import non_negative_int, positive_int, run_main
from shard_tools.errors import InputError
from shard_tools.outdir import staged_out
from shard_tools.pool import ordered_map, process_pool
from shard_tools.schema import CLASSES

_STREAM_ANATOMY, _STREAM_MARKERS = 0, 1

# `--shortcut`: "none" (the default) or "corner" (a class-dependent square in the top border).
SHORTCUTS = ("none", "corner")


# Anatomy is drawn at this resolution at most, then upsampled: radiographs are smooth at this scale, and
# drawing 128 x 128 instead of 299 x 299 makes generation about 4x faster. Noise is added at full size.
_DRAW_PX = 128


@lru_cache(maxsize=4)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1], float32, each (n, n): (x to the right, y down)."""
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    return np.broadcast_to(c[None, :], (n, n)), np.broadcast_to(c[:, None], (n, n))


def _resize(a: np.ndarray, n: int) -> np.ndarray:
    """Bicubic resize of a float32 (h, w) array to (n, n)."""
    if a.shape == (n, n):
        return a
    return np.asarray(Image.fromarray(a).resize((n, n), Image.Resampling.BICUBIC))


def _smooth_noise(rng: np.random.Generator, cells: int, n: int) -> np.ndarray:
    """Smooth random field, ~N(0, 1), features about n/cells pixels wide; float32 (n, n)."""
    return _resize(rng.standard_normal((cells, cells), dtype=np.float32), n)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _ellipse(p: np.ndarray, q: np.ndarray, cp: float, cq: float, rp: float, rq: float, soft: float):
    """Soft ellipse mask in [0, 1]: 1 inside, 0 outside, edge width ~ soft (body units)."""
    d = np.sqrt(((p - cp) / rp) ** 2 + ((q - cq) / rq) ** 2)
    return _sigmoid((1.0 - d) / soft)


def draw(class_name: str, size: int, rng: np.random.Generator, marker_rng: np.random.Generator) -> np.ndarray:
    """One synthetic radiograph of `class_name`: uint8 (size, size), 0 black .. 255 white."""
    return draw_with_lungs(class_name, size, rng, marker_rng)[0]


def draw_with_lungs(
    class_name: str, size: int, rng: np.random.Generator, marker_rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(`draw`'s radiograph, its lung mask): both uint8 (size, size); the mask is 255 on the lung fields
    outside the heart shadow (field x (1 - heart) > 0.5), 0 elsewhere. The mask takes nothing from `rng`,
    so the image is as `draw`'s."""
    if class_name not in CLASSES:
        raise ValueError(f"unknown class {class_name!r}; expected one of {CLASSES}")
    n = min(size, _DRAW_PX)
    x, y = _grid(n)
    child = class_name == "Viral Pneumonia"
    # Body frame: p across (0 = midline, + = image right = patient's left), q down (0 = mid-chest).
    # A child's chest fills less of the film; the ranges overlap with adults on purpose.
    scale = rng.uniform(0.72, 0.9) if child else rng.uniform(0.82, 1.0)
    angle = np.deg2rad(rng.uniform(-5, 5))
    cx, cy = 0.5 + rng.normal(0, 0.025), 0.5 + rng.normal(0, 0.025)
    dx, dy = (x - cx) / scale, (y - cy) / scale
    ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    p, q = ca * dx + sa * dy, -sa * dx + ca * dy
    ap = np.abs(p)

    width = rng.uniform(0.40, 0.45) * (1.05 if child else 1.0)  # children's chests are rounder
    body = _ellipse(p, q, 0.0, 0.25, width, 0.8, 0.03)
    body = np.maximum(body, _ellipse(p, q, 0.0, -0.52, width + 0.12, 0.16, 0.04))  # shoulders
    body = np.maximum(body, _sigmoid((0.09 - ap) / 0.02))  # neck

    # Lungs: two tall ellipses cut by domed diaphragms; the right hemidiaphragm (image left) sits higher.
    lung = np.zeros_like(p)
    for side in (-1.0, 1.0):
        lc = side * rng.uniform(0.17, 0.2)
        shape = _ellipse(p, q, lc, -0.04, rng.uniform(0.13, 0.155), rng.uniform(0.31, 0.35), 0.06)
        dome = (0.22 if side < 0 else 0.26) + rng.normal(0, 0.02) + 1.4 * (p - lc) ** 2
        lung = np.maximum(lung, shape * _sigmoid((dome - q) / 0.015))

    heart_r = rng.uniform(0.14, 0.17) * (1.12 if child else 1.0)  # relatively larger heart in a child
    heart = _ellipse(p, q, rng.uniform(0.03, 0.07), rng.uniform(0.12, 0.16), heart_r, heart_r * 0.78, 0.08)
    spine = _sigmoid((0.04 - ap) / 0.012)
    vertebrae = 0.5 + 0.5 * np.cos(2 * np.pi * q / 0.07)

    # Posterior ribs arch over the lungs: up and out from the spine, then down laterally.
    rib_t = q + 0.7 * ap - 2.0 * (ap - 0.1) ** 2 + rng.uniform(0, 0.08)
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * rib_t / rng.uniform(0.075, 0.09))) ** 4
    ribs = (
        ribs
        * _sigmoid((width - 0.03 - ap) / 0.02)
        * _sigmoid((0.28 - q) / 0.04)
        * _sigmoid((ap - 0.05) / 0.01)
    )
    clavicle = np.exp(-(((q + 0.36 - 0.3 * ap) / 0.02) ** 2)) * _sigmoid((0.3 - ap) / 0.02)

    # Vessels fan out from the hila as streaks that fade towards the periphery; every class has them,
    # so faint interstitial disease is not trivially separable from normal lungs.
    hp, hq = p - np.sign(p) * 0.08, q - 0.02
    theta = np.arctan2(hq, np.abs(hp))
    wobble = 2.5 * _smooth_noise(rng, 6, n)
    vessels = (0.5 + 0.5 * np.cos(22 * theta + wobble)) ** 6 * np.exp(-np.sqrt(hp**2 + hq**2) / 0.14)
    markings = rng.uniform(0.05, 0.12) * vessels

    opacity = np.zeros_like(p)
    if class_name == "COVID":
        # Ground glass: bilateral, peripheral, worse at the bases, patchy.
        peripheral = _sigmoid((ap - rng.uniform(0.14, 0.2)) / 0.04)
        lower = _sigmoid((q - rng.uniform(-0.15, 0.05)) / 0.08)
        patchy = np.clip(0.6 + 0.5 * _smooth_noise(rng, 7, n), 0, None)
        opacity = rng.uniform(0.12, 0.28) * peripheral * (0.35 + 0.65 * lower) * patchy
    elif class_name == "Lung_Opacity":
        # Consolidation of (part of) one lobe; one edge straight as along a fissure.
        side = rng.choice((-1.0, 1.0))
        cp, cq = side * rng.uniform(0.12, 0.24), rng.uniform(-0.2, 0.16)
        rp, rq = rng.uniform(0.07, 0.13), rng.uniform(0.07, 0.14)
        patch = _ellipse(p, q, cp, cq, rp, rq, 0.25)
        tilt = rng.uniform(-0.5, 0.5)
        fissure = _sigmoid((rng.choice((-1.0, 1.0)) * (q - cq - tilt * (p - cp)) + 0.4 * rq) / 0.01)
        texture = 0.85 + 0.15 * _smooth_noise(rng, 16, n)
        opacity = rng.uniform(0.18, 0.36) * patch * fissure * texture
    elif class_name == "Viral Pneumonia":
        # Diffuse interstitial net (zero crossings of a band-pass field), bilateral, perihilar.
        band = _smooth_noise(rng, 30, n) - 0.6 * _smooth_noise(rng, 15, n)
        reticular = np.exp(-((band / 0.35) ** 2))
        central = 0.5 + 0.5 * np.exp(-((ap - 0.12) ** 2) / 0.02)
        opacity = rng.uniform(0.07, 0.15) * reticular * central + rng.uniform(0.0, 0.04)

    # Attenuation: soft tissue bright, lung air dark; the heart, in front, hides the lung behind it.
    tissue = 0.40 + 0.08 * _sigmoid((q - 0.25) / 0.1)  # abdomen below the domes is denser
    img = 0.05 + body * tissue
    img = img - 0.28 * lung * (1.0 - 0.7 * heart)
    img = img + 0.12 * heart + 0.14 * spine * body * (0.8 + 0.2 * vertebrae) * (1 - 0.5 * heart)
    img = img + lung * (0.09 * ribs + markings * (1 - heart) + opacity) + 0.06 * ribs * (1 - lung) * body
    img = img + 0.12 * clavicle * body

    # Acquisition: exposure gradient, window/contrast, gamma, then quantum noise at full size.
    img = img * (1.0 + 0.08 * _smooth_noise(rng, 3, n))
    lo, hi = rng.uniform(-0.05, 0.08), rng.uniform(0.62, 0.78)
    img = np.clip((img - lo) / (hi - lo), 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    img = _resize(img.astype(np.float32), size)
    img = img + rng.uniform(0.003, 0.012) * rng.standard_normal(img.shape, dtype=np.float32)
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    _burn_in_markers(out, marker_rng)
    field = (lung * (1.0 - heart)).astype(np.float32)
    mask = np.where(_resize(field, size) > 0.5, 255, 0).astype(np.uint8)
    return out, mask


def shortcut_box(label: int, size: int) -> tuple[int, int, int, int]:
    """`--shortcut corner`'s square for class id `label` in a size x size image: (x0, y0, x1, y1), the
    pixels [y0, y1) x [x0, x1) (see the module docstring)."""
    side = max(2, round(0.06 * size))
    x0, y0 = round((0.03 + 0.12 * label) * size), round(0.03 * size)
    return x0, y0, x0 + side, y0 + side


def plant_shortcut(img: np.ndarray, label: int) -> None:
    """Draw, in place, class `label`'s `--shortcut corner` square: white, filled."""
    x0, y0, x1, y1 = shortcut_box(label, img.shape[0])
    img[y0:y1, x0:x1] = 255


@lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=px)  # Pillow >= 10.1, with FreeType
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()  # a small fixed-size bitmap font


def _burn_in_markers(img: np.ndarray, rng: np.random.Generator) -> None:
    """Draw, in place and at random, a side letter and/or a label box in a corner (independent of class)."""
    size = img.shape[0]
    if rng.random() > 0.6:
        return
    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    font_px = max(8, size // 14)
    m = size // 30
    corners = [
        (m, m),
        (size - m - font_px, m),
        (m, size - m - font_px),
        (size - m - font_px, size - m - font_px),
    ]
    if rng.random() < 0.7:
        d.text(
            corners[rng.integers(4)],
            "LR"[rng.integers(2)],
            fill=int(rng.integers(200, 256)),
            font=_font(font_px),
        )
    if rng.random() < 0.4:
        x0, y0 = corners[rng.integers(4)]
        w = int(rng.integers(font_px * 2, font_px * 4))
        x0 = min(x0, size - m - w)
        d.rectangle(
            (x0, y0, x0 + w, y0 + font_px), outline=int(rng.integers(180, 256)), width=max(1, size // 150)
        )
    img[...] = np.asarray(im)


def image_path(out: Path, class_name: str, i: int) -> Path:
    """`OUT/<Class>/images/<Class>-<i>.png`, the database's newer layout (i counts from 1)."""
    return out / class_name / "images" / f"{class_name}-{i}.png"


def mask_path(out: Path, class_name: str, i: int) -> Path:
    """`OUT/<Class>/masks/<Class>-<i>.png`, beside `image_path` as in the database."""
    return out / class_name / "masks" / f"{class_name}-{i}.png"


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # compress_level 1: these are inputs to pack, written once and read once; speed matters more.
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _render(job: tuple[str, int, int, int, bool, str]) -> tuple[str, int, bytes, bytes | None]:
    class_name, i, size, seed, masks, shortcut = job
    label = CLASSES.index(class_name)
    rng = np.random.default_rng([seed, label, i, _STREAM_ANATOMY])
    marker_rng = np.random.default_rng([seed, label, i, _STREAM_MARKERS])
    img, mask = draw_with_lungs(class_name, size, rng, marker_rng)
    if shortcut == "corner":
        plant_shortcut(img, label)
    return class_name, i, _png(img), _png(mask) if masks else None


def generate(
    out: Path | str,
    per_class: int = 250,
    size: int = 299,
    seed: int = 0,
    workers: int | None = None,
    *,
    force: bool = False,
    masks: bool = False,
    shortcut: str = "none",
) -> Path:
    """Write `per_class` images of each class to `OUT/<Class>/images/<Class>-<i>.png`; return OUT.

    uint8 gray PNGs, (size, size). With `masks`, each image's lung mask too, at `mask_path`. `shortcut`
    is one of `SHORTCUTS` (see the module docstring). Deterministic in (per_class, size, seed, shortcut),
    whatever `workers` is (default: all cores). OUT must be absent or empty, or with `force` an earlier
    synth output (nothing else is ever replaced). The images are written to a staging folder beside OUT
    that replaces OUT at the end, so an interrupted or failed run leaves OUT as it was.

    Raises `InputError` for bad arguments or an OUT that may not be replaced, `outdir.WriteError` when
    writing fails (disk full).
    """
    out = Path(out)
    if per_class < 1:
        raise InputError(f"--per-class must be >= 1, got {per_class}")
    if size < 32:
        raise InputError(f"--size must be >= 32 pixels, got {size}")
    if shortcut not in SHORTCUTS:
        raise InputError(f"--shortcut must be one of {', '.join(SHORTCUTS)}, got {shortcut!r}")
    with staged_out(out, force=force, foreign=not_synth_output, owned_what="synthetic images") as tmp:
        for c in CLASSES:
            (tmp / c / "images").mkdir(parents=True)
            if masks:
                (tmp / c / "masks").mkdir()
        jobs = [(c, i, size, seed, masks, shortcut) for c in CLASSES for i in range(1, per_class + 1)]
        workers = min(workers or os.cpu_count() or 1, len(jobs))
        with process_pool(workers if len(jobs) >= 32 else 1) as pool:
            for rendered in ordered_map(pool, _render, jobs, chunksize=16):
                _write(tmp, *rendered)
    return out


def _write(tmp: Path, class_name: str, i: int, png: bytes, mask: bytes | None) -> None:
    image_path(tmp, class_name, i).write_bytes(png)
    if mask is not None:
        mask_path(tmp, class_name, i).write_bytes(mask)


_SYNTH_FILE = re.compile(r"^(?P<cls>.+)-[1-9][0-9]*\.png$")


def not_synth_output(out: Path) -> list[str]:
    """What in an existing OUT synth did not write: anything but `<Class>/{images,masks}/<Class>-<i>.png`."""
    foreign = []
    for entry in sorted(out.iterdir()):
        if entry.name not in CLASSES or entry.is_symlink() or not entry.is_dir():
            foreign.append(str(entry))
            continue
        for sub in sorted(entry.iterdir()):
            if sub.name not in ("images", "masks") or sub.is_symlink() or not sub.is_dir():
                foreign.append(str(sub))
                continue
            for f in sorted(sub.iterdir()):
                m = _SYNTH_FILE.match(f.name)
                if not m or m["cls"] != entry.name or f.is_symlink() or not f.is_file():
                    foreign.append(str(f))
    return foreign


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shard_tools.synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output folder (absent or empty unless --force)")
    ap.add_argument("--per-class", type=positive_int, default=250, help="images per class (default 250)")
    ap.add_argument(
        "--size", type=positive_int, default=299, help="image side in pixels (default 299, as the database)"
    )
    ap.add_argument("--seed", type=non_negative_int, default=0)
    ap.add_argument("--workers", type=positive_int, default=None, help="processes (default: all cores)")
    ap.add_argument(
        "--masks", action="store_true", help="also write each image's lung mask to <Class>/masks/"
    )
    ap.add_argument(
        "--shortcut",
        choices=SHORTCUTS,
        default="none",
        help="corner: plant a class-dependent white square in the top border (for testing audits)",
    )
    ap.add_argument(
        "--force", action="store_true", help="replace OUT if it holds an earlier synth output (nothing else)"
    )
    args = ap.parse_args(argv)
    out = generate(
        args.out,
        args.per_class,
        args.size,
        args.seed,
        args.workers,
        force=args.force,
        masks=args.masks,
        shortcut=args.shortcut,
    )
    what = " and their lung masks" if args.masks else ""
    planted = ", with the corner shortcut planted" if args.shortcut != "none" else ""
    print(f"wrote {args.per_class * len(CLASSES)} images{what} ({args.size}x{args.size}){planted} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
