"""Tiny DICOM files written by pydicom, for the image tests: real Part 10 files with proper file meta."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage


def dicom_dataset(
    pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None, **elements
) -> Dataset:
    """A Secondary Capture dataset holding `pixels` (uint8/uint16/int16, (H, W) or (H, W, 3)), Explicit VR
    Little Endian, with `elements` (DICOM keywords: WindowCenter=..., RescaleSlope=...) set on it."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "OT"
    # Sets Rows, Columns, Bits*, Pixel Representation, Pixel Data, SOP Instance UID and the file meta's
    # Transfer Syntax UID (Explicit VR Little Endian).
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def dicom_bytes(ds: Dataset, *, part10: bool = True) -> bytes:
    """The file's bytes: with the 128-byte preamble, "DICM" and file meta (`part10`), or the bare data set
    in Implicit VR Little Endian, as old ACR-NEMA style files are."""
    buf = io.BytesIO()
    if part10:
        ds.save_as(buf, enforce_file_format=True)
    else:
        bare = Dataset()
        bare.update(ds)  # the data set without its file meta
        pydicom.dcmwrite(buf, bare, implicit_vr=True, little_endian=True)
    return buf.getvalue()


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **elements) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dicom_bytes(dicom_dataset(pixels, photometric, **elements)))
    return path
