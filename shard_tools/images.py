"""Image decoding: the one preprocessing step shared by packing and inference.

`load_gray` is what `shard_tools.pack` stores in the shards and what `cxrdist.predict` applies to a new
radiograph, so a model always sees pixels prepared exactly as it was trained on.

Contract: a DICOM file, or any file PIL can decode (PNG, JPEG, TIFF, ...; 1-, 8- and 16-bit gray, palette,
RGB(A), CMYK), becomes a 2-D ``uint8`` array, 0 = black (no attenuation) .. 255 = white, ``(size, size)``
pixels. A file is DICOM when it has the "DICM" marker at byte 128, or when its name ends in .dcm or
.dicom (then it is read even without the 128-byte preamble, as old ACR-NEMA style files are).

From sample values to 8 bits, one rule for every format:

1. 8-bit samples are kept as they are: 0..255 is already the display range. This covers PNG/JPEG/TIFF in
   8-bit modes and DICOM with 8 bits stored and no modality transform, so the database's 8-bit PNGs
   pack byte-identically, and the same pixels as PNG or as DICOM give the same array.
2. DICOM grayscale (MONOCHROME1/2) follows the DICOM display pipeline (PS3.4 N.2), in this order:
   a. Modality LUT: the Modality LUT Sequence, else Rescale Slope/Intercept (a slope of 1 with an
      intercept of 0 is skipped, keeping 8-bit data 8-bit).
   b. VOI LUT: the first item of a VOI LUT Sequence, which wins over a window as in pydicom's
      `apply_voi_lut`; its output is scaled from the LUT's own smallest..largest entry to 0..255 (LUT
      Descriptors often declare 16 bits for 12-bit entries, which would give a dark image). Else the first
      Window Center/Width pair, with VOI LUT Function LINEAR (the default), LINEAR_EXACT or SIGMOID exactly
      as pydicom's `apply_windowing` computes them, straight to 0..255.
   c. No VOI: rule 1 for 8-bit values, else rule 3.
   d. MONOCHROME1 (0 = white) is inverted last, ``255 - v``, so 0 is always black.
3. Everything else (16-bit PNG/TIFF, 32-bit and float images, DICOM without a VOI after its modality LUT)
   is stretched linearly from its own 0.5th..99.5th percentile to 0..255 and clipped: black is the
   smallest value with at least 0.5 % of the pixels at or below it, white the largest with 0.5 % at or
   above it (sample values, not interpolated). Not 0..65535: a 12-bit detector's image in a 16-bit file
   would come out almost black. Not min..max: one hot pixel, or a burned-in label written at full scale,
   would set the range and darken the whole radiograph; the outer 0.5 % on either side is background
   air, collimator edge or annotation. Where the two percentiles coincide, min..max is used; a constant
   image is black.

Colour: PIL images go to luma (ITU-R 601-2, PIL's "L"); for the database's RGB-saved radiographs, where
R = G = B, this returns the gray value unchanged; alpha is dropped. Colour DICOM (RGB, YBR_* decoded to
RGB by pydicom, PALETTE COLOR through its palette) gets the same luma; deeper than 8 bits, rule 3 after it.

Compressed DICOM is decoded by pydicom's plugins: RLE by pydicom itself, JPEG baseline and JPEG 2000 also
through Pillow; lossless JPEG (common in CR/DX archives), JPEG-LS and HTJ2K need the ``dicom`` extra
(pylibjpeg). Where no installed plugin decodes a syntax, the `ImageError` names it and its UID and says
``pip install 'cxrdist[dicom]'``; syntaxes pydicom cannot decode at all (MPEG, HEVC video) are refused
as such. Also refused: multi-frame DICOM (tomosynthesis or cine is not a single radiograph, and frame 0
chosen silently might be the wrong view: export the frame wanted as its own file), and DICOM without pixel
data.

The resize is PIL's LANCZOS, which widens its kernel by the reduction factor, so downsampling is
antialiased; upsampling (a 224 px image packed at 256) stays smooth rather than blocky, unlike BOX.
Non-square images are resized to a square, not cropped: the database's images are square, and a centre
crop could cut off lung apices or costophrenic angles. JPEG EXIF orientation is applied.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shard_tools.errors import InputError
from shard_tools.files import RefusedInput, read_input_file

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# Larger images are refused before decoding: 8192 x 8192 is twice the largest digital radiograph detector
# and far below what would exhaust memory. PIL's own check warns only above ~89 megapixels.
MAX_PIXELS = 8192 * 8192

RESAMPLE = Image.Resampling.LANCZOS

DICOM_SUFFIXES = (".dcm", ".dicom")

# The files `pack` reads from a class folder and `predict` / `explain` find in a folder (lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", *DICOM_SUFFIXES)

# Rule 3 of the module docstring: the share of pixels, per thousand, that may fall below black and as many
# above white (the 0.5th and 99.5th percentiles).
STRETCH_CLIP_PER_MILLE = 5

# What to install when pydicom has a decoder for a compressed transfer syntax but no plugin to run it.
DICOM_EXTRA = "pip install 'cxrdist[dicom]'"


class ImageError(InputError):
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


def _one_line(error: BaseException) -> str:
    # pydicom lists its plugins' failures on several lines; a reason is one line.
    return " ".join(str(error).split()) or type(error).__name__


# ------------------------------------------------------------------------------------- sample values


def _unit_to_uint8(t: np.ndarray) -> np.ndarray:
    """0..1 (clipped) to 0..255, rounded to nearest."""
    return np.rint(np.clip(t, 0.0, 1.0) * 255.0).astype(np.uint8)


def _map_values(values: np.ndarray, to_uint8: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`to_uint8`, an elementwise map, applied to every pixel of `values`.

    Integer images go through a table of their value range: the same numbers, in a fifth of the time on a
    9-megapixel 16-bit radiograph (one lookup instead of six float passes over the pixels).
    """
    if values.dtype.kind in "ui" and values.size:
        lo, hi = int(values.min()), int(values.max())
        if hi - lo < 2**17:
            if values.dtype.kind == "u":
                return to_uint8(np.arange(hi + 1))[values]
            return to_uint8(np.arange(lo, hi + 1))[values.astype(np.int64) - lo]
    return to_uint8(values)


def _clip_range(a: np.ndarray) -> tuple[float, float]:
    """(lo, hi): the smallest value with at least STRETCH_CLIP_PER_MILLE of the pixels at or below it,
    and the largest with as many at or above it. Sample values, not interpolated between them."""
    n = a.size
    k = max(0, -(-n * STRETCH_CLIP_PER_MILLE // 1000) - 1)  # ceil(n * 5 / 1000) - 1, in exact integers
    if a.dtype.kind in "ui" and a.dtype.itemsize <= 4:  # bincount takes no uint64
        lo, hi = int(a.min()), int(a.max())
        if hi - lo < 2**17:
            # Integer images: a histogram, twice as fast as partitioning 9 megapixels; same values.
            counts = np.bincount(a.ravel() if a.dtype.kind == "u" else (a.astype(np.int64) - lo).ravel())
            below = np.cumsum(counts)  # below[v]: pixels <= v (+ lo for signed images)
            base = 0 if a.dtype.kind == "u" else lo
            return float(base + np.searchsorted(below, k + 1)), float(base + np.searchsorted(below, n - k))
    part = np.partition(a.ravel(), (k, n - 1 - k))
    return float(part[k]), float(part[n - 1 - k])


def stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Rule 3: linearly from the values' own 0.5th..99.5th percentile (`_clip_range`) to 0..255, clipped.

    Falls back to min..max where the percentiles coincide; a constant image gives zeros. Raises
    `ValueError` for NaN or infinite values.
    """
    a = np.asarray(values)
    if a.size == 0:
        return np.zeros(a.shape, dtype=np.uint8)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError("the image contains non-finite values")
    lo, hi = _clip_range(a)
    if hi <= lo:
        lo, hi = float(a.min()), float(a.max())
        if hi <= lo:
            return np.zeros(a.shape, dtype=np.uint8)
    return _map_values(a, lambda v: _unit_to_uint8((v.astype(np.float64) - lo) / (hi - lo)))


def _luma_to_uint8(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB to gray with PIL's "L" weights; deeper than 8 bits, stretched by rule 3."""
    if rgb.dtype == np.uint8:
        return np.asarray(Image.fromarray(np.ascontiguousarray(rgb), "RGB").convert("L"), dtype=np.uint8)
    return stretch_to_uint8(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))


# -------------------------------------------------------------------------------------------------- PIL


def _to_uint8_gray(im: Image.Image) -> np.ndarray:
    """Any PIL mode to a 2-D uint8 array at the image's own size (see the module docstring)."""
    if im.mode == "L":
        return np.asarray(im, dtype=np.uint8)
    if im.mode.startswith("I") or im.mode == "F":  # I;16*, I (32-bit), F: rule 3
        a = np.asarray(im)
        if a.ndim != 2:  # pragma: no cover - PIL's I/F modes are single-band
            raise ValueError(f"unexpected {im.mode} image with shape {a.shape}")
        return stretch_to_uint8(a)
    if im.mode in ("RGB", "1", "P", "LA", "RGBA", "PA"):
        return np.asarray(im.convert("L"), dtype=np.uint8)
    # CMYK, YCbCr, LAB, HSV, ...: through RGB, whose conversion to L every mode supports.
    return np.asarray(im.convert("RGB").convert("L"), dtype=np.uint8)


def _decode_pil(data: bytes, what: str) -> np.ndarray:
    """Any image file PIL opens to uint8 gray at its own size (see the module docstring)."""
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
                return _to_uint8_gray(ImageOps.exif_transpose(im))
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
    except MemoryError:
        raise
    except Exception as e:
        # Pillow trusts the types that EXIF and TIFF tags declare, so a damaged tag surfaces as
        # struct.error, TypeError, AttributeError... (in exif_transpose, or loading a TIFF): the file is
        # unreadable, like any other damaged file, not a crash.
        raise ImageError(what, f"damaged image tags or data ({type(e).__name__}: {_one_line(e)})") from e


# ------------------------------------------------------------------------------------------------ DICOM


def _is_dicom(data: bytes, what: str) -> bool:
    return data[128:132] == b"DICM" or what.lower().endswith(DICOM_SUFFIXES)


def _present(ds: Dataset, keyword: str) -> bool:
    return ds.get(keyword) not in (None, "")


def _has_modality_transform(ds: Dataset) -> bool:
    """Step 2a applies: a Modality LUT Sequence, or a rescale other than slope 1, intercept 0."""
    if ds.get("ModalityLUTSequence"):
        return True
    if not (_present(ds, "RescaleSlope") and _present(ds, "RescaleIntercept")):
        return False
    # The identity is skipped so that 8-bit data stays 8-bit (rule 1).
    return (float(ds.RescaleSlope), float(ds.RescaleIntercept)) != (1.0, 0.0)


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Step 2b with the first VOI LUT Sequence item, scaled from its own entry range to 0..255."""
    from pydicom.pixels import apply_voi

    if values.dtype.kind == "f":
        values = np.rint(values).astype(np.int64)  # a LUT is indexed by integer modality values
    n_entries, first_mapped, _ = ds.VOILUTSequence[0].LUTDescriptor
    # Every entry of the LUT, read by pydicom itself (it knows US vs OW data and the byte order).
    entries = apply_voi(np.arange(first_mapped, first_mapped + (n_entries or 2**16)), ds).astype(np.float64)
    lo, hi = float(entries.min()), float(entries.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return _unit_to_uint8((apply_voi(values, ds).astype(np.float64) - lo) / (hi - lo))


def _window(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Step 2b with the first Window Center/Width pair and the VOI LUT Function, to 0..255."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_windowing

    # pydicom scales to the output range that the dataset's Bits Stored, Pixel Representation and rescale
    # imply; a dataset holding only the window and 8 unsigned bits gives 0..255 directly.
    window = Dataset()
    window.PhotometricInterpretation = "MONOCHROME2"
    window.BitsStored, window.PixelRepresentation = 8, 0
    window.WindowCenter, window.WindowWidth = ds.WindowCenter, ds.WindowWidth
    if _present(ds, "VOILUTFunction"):
        window.VOILUTFunction = ds.VOILUTFunction
    return _map_values(
        values, lambda v: np.rint(np.clip(apply_windowing(v, window, index=0), 0.0, 255.0)).astype(np.uint8)
    )


def _dicom_gray(arr: np.ndarray, ds: Dataset, monochrome1: bool, what: str) -> np.ndarray:
    """Rule 2 of the module docstring for one decoded MONOCHROME1/2 frame."""
    from pydicom.pixels import apply_modality_lut

    voi_items = ds.get("VOILUTSequence")
    try:
        transformed = _has_modality_transform(ds)
        values = apply_modality_lut(arr, ds) if transformed else arr
        if voi_items and _present(voi_items[0], "LUTDescriptor") and _present(voi_items[0], "LUTData"):
            gray = _voi_lut(values, ds)
        elif _present(ds, "WindowCenter") and _present(ds, "WindowWidth"):
            gray = _window(values, ds)
        elif not transformed and arr.dtype == np.uint8 and ds.get("BitsStored") == 8:
            gray = arr
        else:
            gray = stretch_to_uint8(values)
    except Exception as e:
        # The file's own values, through pydicom: a window width < 1, an unknown VOI LUT Function, a LUT
        # without data, a rescale that is not a number... (ValueError, AttributeError, struct.error, ...)
        raise ImageError(what, f"invalid DICOM rescale, LUT or window: {_one_line(e)}") from e
    if monochrome1:
        gray = 255 - gray
    return gray


def _check_transfer_syntax(ds: Dataset, what: str) -> str:
    """Name the transfer syntax as 'Name (UID)'; refuse one that no installed plugin can decode."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" not in ds.file_meta:
        # A file without file meta (no preamble): pydicom found the encoding while reading.
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    uid = ds.file_meta.TransferSyntaxUID
    syntax = f"{uid.name} ({uid})" if uid.name != str(uid) else str(uid)
    if not uid.is_transfer_syntax:
        raise ImageError(
            what, f"Transfer Syntax UID {syntax} is not one pydicom knows; it cannot decode the pixels"
        )
    if not uid.is_compressed:
        return syntax
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as e:
        raise ImageError(
            what,
            f"pixel data compressed as {syntax}, which pydicom cannot decode; convert the file "
            "to an uncompressed transfer syntax",
        ) from e
    if not decoder.is_available:
        raise ImageError(
            what, f"pixel data compressed as {syntax} and no installed plugin decodes it: {DICOM_EXTRA}"
        )
    return syntax


def _decode_dicom(data: bytes, what: str) -> np.ndarray:
    """A DICOM file's bytes to uint8 gray at its own size (see the module docstring)."""
    # pydicom takes ~0.2 s to import; only DICOM input pays for it.
    import pydicom

    try:
        # pydicom warns (and logs) about each oddity of a file it can still read; the file either
        # decodes or becomes one ImageError here, so its warnings would only be noise on stderr.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)  # force: files without the preamble too
            first = next(iter(ds.keys()), None)
            if data[128:132] != b"DICM" and not (first is not None and _known_tag(first)):
                # Without the marker only the name said DICOM; a text file parses as one junk element.
                raise ImageError(
                    what, "not a DICOM file (no 'DICM' marker, and it does not start with a DICOM element)"
                )
            return _dicom_to_gray(ds, what)
    except ImageError:
        raise
    except Exception as e:
        # pydicom parses elements when they are first used, so a damaged file can fail at any step, with
        # any exception type (NotImplementedError for a garbled VR, AttributeError, struct.error, ...).
        raise ImageError(what, f"not a readable DICOM file: {_one_line(e)}") from e


def _known_tag(tag: int) -> bool:
    """A tag a real DICOM file can start with: a group length (gggg,0000) or one in pydicom's dictionary."""
    from pydicom.datadict import dictionary_has_tag

    return tag & 0xFFFF == 0 or dictionary_has_tag(tag)


def _dicom_to_gray(ds: Dataset, what: str) -> np.ndarray:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageError(what, "DICOM file without pixel data (not an image)")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageError(
            what,
            f"multi-frame DICOM ({frames} frames) is not a single radiograph; "
            "export the frame you want as its own file",
        )
    rows, columns = int(ds.Rows), int(ds.Columns)
    if rows * columns > MAX_PIXELS:
        raise ImageError(
            what, f"{columns}x{rows} pixels exceeds the limit of {MAX_PIXELS} (not a radiograph)"
        )
    from pydicom.uid import RLELossless

    syntax = _check_transfer_syntax(ds, what)
    if ds.file_meta.TransferSyntaxUID == RLELossless:
        # pydicom's own RLE decoder: pylibjpeg-rle, when installed, would be preferred, and it prints a
        # Rust panic on stderr for corrupt data before raising.
        ds.pixel_array_options(decoding_plugin="pydicom")
    try:
        arr = ds.pixel_array  # YBR_* colour comes back as RGB
    except Exception as e:  # plugins fail with RuntimeError, ValueError, OSError, ... on bad data
        raise ImageError(what, f"cannot decode the pixel data ({syntax}): {_one_line(e)}") from e
    except BaseException as e:
        # pylibjpeg-rle, written in Rust, panics on corrupt RLE data, and pyo3 raises the panic as a
        # BaseException, which `except Exception` misses. Ctrl-C and SIGTERM pass on.
        if type(e).__name__ != "PanicException":
            raise
        raise ImageError(
            what, f"cannot decode the pixel data ({syntax}): the decoder panicked: {_one_line(e)}"
        ) from e
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        gray = _dicom_gray(arr, ds, photometric == "MONOCHROME1", what)
    elif photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        gray = _luma_to_uint8(apply_color_lut(arr, ds))
    elif arr.ndim == 3 and arr.shape[-1] == 3:
        gray = _luma_to_uint8(arr)
    else:
        raise ImageError(what, f"unsupported DICOM Photometric Interpretation {photometric!r}")
    return np.ascontiguousarray(gray, dtype=np.uint8)


# ------------------------------------------------------------------------------------------- public API


def decode_gray(src: str | Path | bytes, *, name: str | None = None) -> np.ndarray:
    """Decode `src` (a path or the file's bytes) to uint8 gray at its original size, shape (H, W).

    DICOM is recognised by content (or by a .dcm/.dicom `name` or path); everything else goes to PIL.
    Raises `ImageError` naming the file (`name`, else the path) for an empty, truncated, corrupt,
    non-image, oversized or undecodable file.
    """
    what = _describe(src, name)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    else:
        try:
            data = read_input_file(src)
        except RefusedInput as e:  # a FIFO, a device or a link to one, a huge or sparse file
            raise ImageError(what, e.strerror) from e
        except OSError as e:
            raise ImageError(what, f"cannot read: {e.strerror or e}") from e
    if not data:
        raise ImageError(what, "empty file (0 bytes)")
    if _is_dicom(data, what):
        gray = _decode_dicom(data, what)
    else:
        gray = _decode_pil(data, what)
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
