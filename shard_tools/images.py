"""Image decoding: the one preprocessing step shared by packing and inference.

`load_gray` is what `shard_tools.pack` stores in the shards and what `cxrdist.predict` applies to a new
radiograph, so a model always sees pixels prepared exactly as it was trained on.

Contract: any file PIL can decode (PNG, JPEG, TIFF, ...; 1-, 8- and 16-bit gray, palette, RGB(A), CMYK)
becomes a 2-D ``uint8`` array, 0 = black (no attenuation) .. 255 = white, ``(size, size)`` pixels.

- Colour is reduced to luma (ITU-R 601-2, PIL's "L"); for the database's RGB-saved radiographs, where
  R = G = B, this returns the gray value unchanged. Alpha is dropped.
- 16-bit and 32-bit integer images are mapped linearly from 0..65535 to 0..255 (``round(v / 257)``), not
  clipped at 255 as a plain ``convert("L")`` would. Values outside 0..65535, and float images, are
  stretched from their own min..max to 0..255.
- The resize is PIL's LANCZOS, which widens its kernel by the reduction factor, so downsampling is
  antialiased; upsampling (a 224 px image packed at 256) stays smooth rather than blocky, unlike BOX.
- Non-square images are resized to a square, not cropped: the database's images are square, and a centre
  crop could cut off lung apices or costophrenic angles.
- JPEG EXIF orientation is applied.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Larger images are refused before decoding: 8192 x 8192 is twice the largest digital radiograph detector
# and far below what would exhaust memory. PIL's own check warns only above ~89 megapixels.
MAX_PIXELS = 8192 * 8192

RESAMPLE = Image.Resampling.LANCZOS

# The files `pack` reads from a class folder and `predict` / `explain` find in a folder (lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ImageError(ValueError):
    """A file could not be decoded as an image. The message names the file and why.

    `name` is the file (or the name given for bytes), `reason` the cause alone, as `pack` records it.
    """

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason

    def __reduce__(self):  # so it survives the trip back from a worker process
        return type(self), (self.name, self.reason)


def _describe(src: str | Path | bytes, name: str | None) -> str:
    if name is not None:
        return name
    return "<bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else str(src)


def _to_uint8_gray(im: Image.Image) -> np.ndarray:
    """Any PIL mode to a 2-D uint8 array at the image's own size (see the module docstring)."""
    if im.mode == "L":
        return np.asarray(im, dtype=np.uint8)
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im)
        if a.ndim != 2:  # pragma: no cover - PIL's I/F modes are single-band
            raise ValueError(f"unexpected {im.mode} image with shape {a.shape}")
        if im.mode != "F" and a.size and a.min() >= 0 and a.max() <= 65535:
            # Full 16-bit range: 65535 -> 255, exactly linear (x * 255 / 65535 = x / 257).
            return np.rint(a.astype(np.float64) / 257.0).astype(np.uint8)
        a = a.astype(np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if not np.isfinite(lo) or not np.isfinite(hi):
            raise ValueError(f"{im.mode} image contains non-finite values")
        if hi <= lo:
            return np.zeros(a.shape, dtype=np.uint8)
        return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    if im.mode in ("RGB", "1", "P", "LA", "RGBA", "PA"):
        return np.asarray(im.convert("L"), dtype=np.uint8)
    # CMYK, YCbCr, LAB, HSV, ...: through RGB, whose conversion to L every mode supports.
    return np.asarray(im.convert("RGB").convert("L"), dtype=np.uint8)


def decode_gray(src: str | Path | bytes, *, name: str | None = None) -> np.ndarray:
    """Decode `src` (a path or the file's bytes) to uint8 gray at its original size, shape (H, W).

    Raises `ImageError` naming the file (`name`, else the path) for an empty, truncated, corrupt,
    non-image or oversized file.
    """
    what = _describe(src, name)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    else:
        try:
            data = Path(src).read_bytes()
        except OSError as e:
            raise ImageError(what, f"cannot read: {e.strerror or e}") from e
    if not data:
        raise ImageError(what, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL only warns between 89 and 179 megapixels; refuse instead of decoding.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ImageError(
                        what,
                        f"{im.width}x{im.height} pixels exceeds the limit of {MAX_PIXELS} "
                        "(a decompression bomb, or not a radiograph)",
                    )
                im.load()
                gray = _to_uint8_gray(ImageOps.exif_transpose(im))
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError(what, "not a recognised image file") from e
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(what, f"refused as a decompression bomb: {e}") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        # PIL reports truncation as OSError("image file is truncated ...") and bad chunks as
        # SyntaxError/ValueError; its message names the cause.
        raise ImageError(what, f"corrupt or truncated image: {e}") from e
    if gray.ndim != 2 or gray.size == 0:
        raise ImageError(what, "decoded to an empty image")
    return gray


def resize_gray(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D uint8 image to (size, size) with LANCZOS; size 0 returns it unchanged."""
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if size == 0 or gray.shape == (size, size):
        return np.ascontiguousarray(gray, dtype=np.uint8)
    im = Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8)).resize((size, size), RESAMPLE)
    return np.asarray(im, dtype=np.uint8)


def load_gray(src: str | Path | bytes, size: int, *, name: str | None = None) -> np.ndarray:
    """Decode and resize: uint8, shape (size, size), 0..255; size 0 keeps the original (H, W).

    The single preprocessing function for shards and inference. Raises `ImageError` (see `decode_gray`).
    """
    return resize_gray(decode_gray(src, name=name), size)


def encode_png(gray: np.ndarray) -> bytes:
    """Lossless 8-bit gray PNG. Deterministic: same pixels give the same bytes with the same zlib."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8)).save(
        buf, format="PNG", compress_level=6, optimize=False
    )
    return buf.getvalue()


def pixel_sha256(gray: np.ndarray) -> str:
    """sha256 of the uint8 pixels, row-major (the shard format's `pixel_sha256`)."""
    return hashlib.sha256(np.ascontiguousarray(gray, dtype=np.uint8).tobytes()).hexdigest()
