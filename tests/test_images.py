"""shard_tools.images: DICOM (written by pydicom here) and 16-bit input to 8-bit gray, pixel by pixel.

Expected values come from the formulas of the DICOM standard (PS3.3 C.11.2.1.2-3) and the module's
documented percentile rule, computed here with numpy, not from the code under test.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from dicomgen import dicom_bytes, dicom_dataset, write_dicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import convert_color_space, get_decoder
from pydicom.uid import JPEG2000, MPEG2MPML, JPEG2000Lossless, RLELossless

from shard_tools import images
from shard_tools.errors import EXIT_USAGE, InputError, exit_code_for
from shard_tools.images import ImageError, decode_gray, load_gray

# Every 12-bit value once: the pixel at (r, c) holds 64 r + c.
RAMP12 = np.arange(4096, dtype=np.uint16).reshape(64, 64)


def _at(gray: np.ndarray, value: int) -> int:
    """The output pixel where RAMP12 holds `value`."""
    return int(gray[value // 64, value % 64])


def _to_byte(t: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(t, 0, 1) * 255).astype(np.uint8)


def linear(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """VOI LUT Function LINEAR (PS3.3 C.11.2.1.2.1) to 0..255."""
    x = x.astype(np.float64)
    c, w = center - 0.5, width - 1
    t = (x - c) / w + 0.5
    t[x <= c - w / 2] = 0
    t[x > c + w / 2] = 1
    return _to_byte(t)


def linear_exact(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """LINEAR_EXACT (C.11.2.1.3.2)."""
    x = x.astype(np.float64)
    t = (x - center) / width + 0.5
    t[x <= center - width / 2] = 0
    t[x > center + width / 2] = 1
    return _to_byte(t)


def sigmoid(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """SIGMOID (C.11.2.1.3.1)."""
    return _to_byte(1 / (1 + np.exp(-4 * (x.astype(np.float64) - center) / width)))


def percentile_stretch(x: np.ndarray) -> np.ndarray:
    """The module's rule 3: from the sample values at the 0.5th and 99.5th percentile to 0..255."""
    s = np.sort(x.astype(np.float64).ravel())
    k = math.ceil(s.size / 200) - 1  # the first value with 0.5 % of the pixels at or below it
    lo, hi = s[k], s[s.size - 1 - k]
    return _to_byte((x.astype(np.float64) - lo) / (hi - lo))


def _decode(ds: Dataset) -> np.ndarray:
    return decode_gray(dicom_bytes(ds), name="x.dcm")


def _image_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ windowing


def test_window_center_width_linear_maps_pixels_as_the_standard_says():
    gray = _decode(dicom_dataset(RAMP12, bits_stored=12, WindowCenter=2048, WindowWidth=1024))
    assert gray.dtype == np.uint8 and gray.shape == (64, 64)
    np.testing.assert_array_equal(gray, linear(RAMP12, 2048, 1024))
    # By hand: the window is 1536 < x <= 2559 after LINEAR's half-pixel shift.
    assert _at(gray, 1000) == 0 and _at(gray, 1536) == 0  # below the window: black
    assert _at(gray, 3000) == 255 and _at(gray, 2559) == 255  # above: white
    assert _at(gray, 2048) == 128  # (0.5 / 1023 + 0.5) * 255 = 127.6
    assert _at(gray, 1792) == 64  # (-255.5 / 1023 + 0.5) * 255 = 63.8


@pytest.mark.parametrize(("function", "formula"), [("LINEAR_EXACT", linear_exact), ("SIGMOID", sigmoid)])
def test_voi_lut_function_is_respected(function, formula):
    ds = dicom_dataset(RAMP12, bits_stored=12, WindowCenter=1500, WindowWidth=800, VOILUTFunction=function)
    gray = _decode(ds)
    np.testing.assert_array_equal(gray, formula(RAMP12, 1500, 800))
    assert not np.array_equal(gray, linear(RAMP12, 1500, 800))  # the function made a difference


def test_first_of_several_windows_is_used():
    several = _decode(dicom_dataset(RAMP12, bits_stored=12, WindowCenter=[2048, 300], WindowWidth=[1024, 99]))
    np.testing.assert_array_equal(several, linear(RAMP12, 2048, 1024))


def test_rescale_slope_intercept_applies_before_the_window():
    ds = dicom_dataset(
        RAMP12, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=0, WindowWidth=2001
    )
    gray = _decode(ds)
    modality = RAMP12.astype(np.float64) * 2 - 1024  # the window is in rescaled units
    np.testing.assert_array_equal(gray, linear(modality, 0, 2001))
    assert not np.array_equal(gray, linear(RAMP12, 0, 2001))
    assert _at(gray, 0) == 0 and _at(gray, 512) == 128 and _at(gray, 1100) == 255


def test_negative_rescale_slope_without_window_inverts():
    gray = _decode(dicom_dataset(RAMP12, bits_stored=12, RescaleSlope=-1, RescaleIntercept=4095))
    np.testing.assert_array_equal(gray, percentile_stretch(4095 - RAMP12.astype(np.int64)))
    assert _at(gray, 0) == 255 and _at(gray, 4095) == 0


def test_voi_lut_sequence_wins_over_the_window_and_spans_its_own_range():
    # A square-root LUT with 12-bit entries whose descriptor declares 16 bits, as many files do.
    lut = np.rint(4095 * np.sqrt(np.arange(4096) / 4095)).astype(np.uint16)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor: entries, first mapped value, bits
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
    ds = dicom_dataset(RAMP12, bits_stored=12, WindowCenter=100, WindowWidth=10)
    ds.VOILUTSequence = [item]
    gray = _decode(ds)
    np.testing.assert_array_equal(gray, _to_byte(lut[RAMP12] / 4095))
    assert gray.min() == 0 and gray.max() == 255


def test_monochrome1_is_255_minus_monochrome2():
    for pixels, bits, window in [
        (RAMP12, 12, {"WindowCenter": 2048, "WindowWidth": 1024}),
        (RAMP12, 12, {}),
        ((RAMP12 % 256).astype(np.uint8), 8, {}),
    ]:
        mono2 = _decode(dicom_dataset(pixels, "MONOCHROME2", bits, **window))
        mono1 = _decode(dicom_dataset(pixels, "MONOCHROME1", bits, **window))
        np.testing.assert_array_equal(mono1, 255 - mono2)
        assert len(np.unique(mono2)) > 200  # not a degenerate image that any rule would pass


def test_8bit_dicom_without_window_is_kept_as_is_like_an_8bit_png():
    pixels = np.random.default_rng(0).integers(0, 256, (24, 40), dtype=np.uint8)
    gray = _decode(dicom_dataset(pixels))
    np.testing.assert_array_equal(gray, pixels)
    np.testing.assert_array_equal(gray, decode_gray(_image_bytes(pixels)))
    # Rescale 1 / 0 is the identity and keeps it 8-bit (no stretch).
    np.testing.assert_array_equal(_decode(dicom_dataset(pixels, RescaleSlope=1, RescaleIntercept=0)), pixels)


def test_16bit_dicom_without_window_is_stretched_by_percentiles_not_by_a_hot_pixel():
    gray = _decode(dicom_dataset(RAMP12, bits_stored=12))
    np.testing.assert_array_equal(gray, percentile_stretch(RAMP12))
    assert gray.min() == 0 and gray.max() == 255 and _at(gray, 2048) == 128

    hot = RAMP12.copy()
    hot[0, 1] = 65535  # one hot pixel in a 12-bit image: min..max would map 4095 to 16
    gray_hot = _decode(dicom_dataset(hot, bits_stored=16))
    assert gray_hot[0, 1] == 255
    rest = np.ones(hot.shape, bool)
    rest[0, 1] = False
    assert np.abs(gray_hot[rest].astype(int) - gray[rest]).max() <= 1
    assert _at(gray_hot, 4095) == 255


# ------------------------------------------------------------------------------ 8- and 16-bit PNG / TIFF


def test_16bit_png_and_tiff_using_12_bits_span_the_full_8bit_range():
    png = decode_gray(_image_bytes(RAMP12))
    np.testing.assert_array_equal(png, percentile_stretch(RAMP12))
    assert png.min() == 0 and png.max() == 255 and _at(png, 2048) == 128  # was 8 (2048 / 257) before
    np.testing.assert_array_equal(decode_gray(_image_bytes(RAMP12, "TIFF")), png)
    # Same samples, same pixels, whatever the container.
    np.testing.assert_array_equal(_decode(dicom_dataset(RAMP12, bits_stored=12)), png)


def test_8bit_png_and_tiff_pixels_are_unchanged():
    pixels = np.random.default_rng(1).integers(0, 256, (33, 47), dtype=np.uint8)
    pixels[0, 0], pixels[0, 1] = 40, 200  # no stretch: the range stays 40..200 where it is
    narrow = np.clip(pixels, 40, 200)
    for fmt in ("PNG", "TIFF"):
        np.testing.assert_array_equal(decode_gray(_image_bytes(narrow, fmt)), narrow, err_msg=fmt)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.uint64, np.float32])
def test_stretch_is_the_percentile_rule_for_every_sample_type(dtype):
    kind = np.dtype(dtype).kind
    low, high = (-1000, 2000) if kind in "if" else (0, 256 if dtype == np.uint8 else 3000)
    values = np.random.default_rng(4).integers(low, high, (37, 53)).astype(dtype)
    gray = images.stretch_to_uint8(values)
    np.testing.assert_array_equal(gray, percentile_stretch(values))
    assert gray.min() == 0 and gray.max() == 255
    np.testing.assert_array_equal(images.stretch_to_uint8(np.full((4, 4), 7, dtype)), np.zeros((4, 4)))


def test_float_image_is_stretched_and_nan_is_refused():
    ramp = np.linspace(-1.0, 3.0, 50 * 20, dtype=np.float32).reshape(20, 50)
    np.testing.assert_array_equal(decode_gray(_image_bytes(ramp, "TIFF")), percentile_stretch(ramp))
    ramp[3, 3] = np.nan
    with pytest.raises(ImageError, match="non-finite"):
        decode_gray(_image_bytes(ramp, "TIFF"), name="f.tif")


# ---------------------------------------------------------------------------------- compressed syntaxes


@pytest.mark.parametrize(("pixels", "bits"), [(RAMP12, 12), ((RAMP12 % 251).astype(np.uint8), 8)])
def test_rle_lossless_decodes_to_exactly_the_uncompressed_output(pixels, bits):
    plain = dicom_dataset(pixels, bits_stored=bits, WindowCenter=120, WindowWidth=200)
    rle = dicom_dataset(pixels, bits_stored=bits, WindowCenter=120, WindowWidth=200)
    rle.compress(RLELossless, encoding_plugin="pydicom")
    assert rle.file_meta.TransferSyntaxUID == RLELossless and rle.PixelData != plain.PixelData
    np.testing.assert_array_equal(_decode(rle), _decode(plain))


def test_jpeg2000_lossless_decodes_through_the_installed_plugin():
    pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg (the dicom extra) encodes JPEG 2000")
    ds = dicom_dataset(RAMP12, bits_stored=12)
    ds.compress(JPEG2000Lossless)
    np.testing.assert_array_equal(_decode(ds), percentile_stretch(RAMP12))


def _fake_compressed(uid) -> Dataset:
    """Uncompressed pixels wrapped as if compressed with `uid` (encapsulated, one fragment)."""
    ds = dicom_dataset(RAMP12, bits_stored=12)
    ds.PixelData = encapsulate([RAMP12.tobytes()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = uid
    return ds


def test_compressed_syntax_without_an_installed_plugin_names_it_and_the_extra(monkeypatch):
    monkeypatch.setattr(get_decoder(JPEG2000), "_available", {})  # as without pylibjpeg and Pillow's J2K
    with pytest.raises(ImageError) as e:
        _decode(_fake_compressed(JPEG2000))
    assert e.value.name == "x.dcm"
    assert "JPEG 2000 Image Compression (1.2.840.10008.1.2.4.91)" in e.value.reason
    assert "pip install 'cxrdist[dicom]'" in e.value.reason and "\n" not in str(e.value)


def test_undecodable_pixel_data_and_syntaxes_name_the_syntax():
    with pytest.raises(ImageError, match=r"cannot decode the pixel data \(JPEG 2000 Image Compression "):
        _decode(_fake_compressed(JPEG2000))  # plugins installed, but the bytes are no JPEG 2000
    with pytest.raises(
        ImageError, match=r"MPEG2 Main Profile / Main Level \(1\.2\.840\.10008\.1\.2\.4\.100\)"
    ):
        _decode(_fake_compressed(MPEG2MPML))
    # JPEG XL (DICOM 2024) is newer than pydicom 3.0: the file names it by UID (same length as MPEG2's).
    jpeg_xl = dicom_bytes(_fake_compressed(MPEG2MPML)).replace(MPEG2MPML.encode(), b"1.2.840.10008.1.2.4.110")
    with pytest.raises(ImageError, match=r"1\.2\.840\.10008\.1\.2\.4\.110\b.*cannot decode"):
        decode_gray(jpeg_xl, name="x.dcm")


# ----------------------------------------------------------------------------------- sources and errors


def test_dicom_from_path_bytes_and_without_preamble(tmp_path: Path):
    ds = dicom_dataset(RAMP12, bits_stored=12, WindowCenter=2048, WindowWidth=1024)
    expected = linear(RAMP12, 2048, 1024)
    data = dicom_bytes(ds)
    assert data[128:132] == b"DICM"
    path = tmp_path / "scan.dcm"
    path.write_bytes(data)
    np.testing.assert_array_equal(decode_gray(path), expected)
    np.testing.assert_array_equal(decode_gray(data), expected)  # by content, no name (a zip member)
    np.testing.assert_array_equal(decode_gray(data, name="COVID/images/a.png"), expected)  # content wins
    np.testing.assert_array_equal(load_gray(data, 16, name="a.dcm"), images.resize_gray(expected, 16))

    bare = dicom_bytes(ds, part10=False)
    assert b"DICM" not in bare[:200]
    np.testing.assert_array_equal(decode_gray(bare, name="old/IM0001.DCM"), expected)  # by name
    with pytest.raises(ImageError, match="not a recognised image file"):
        decode_gray(bare, name="IM0001")  # neither marker nor name: not taken for DICOM


def test_colour_dicom_becomes_luma():
    rgb = np.random.default_rng(2).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    as_png = decode_gray(_image_bytes(rgb))
    np.testing.assert_array_equal(_decode(dicom_dataset(rgb, "RGB")), as_png)
    ybr = _decode(dicom_dataset(convert_color_space(rgb, "RGB", "YBR_FULL"), "YBR_FULL"))
    assert np.abs(ybr.astype(int) - as_png).max() <= 2  # YBR -> RGB rounds


def test_dicom_that_is_not_one_radiograph_is_refused(tmp_path: Path, monkeypatch):
    frames = np.stack([RAMP12, RAMP12[::-1]])
    with pytest.raises(ImageError, match=r"multi-frame DICOM \(2 frames\)"):
        _decode(dicom_dataset(frames, bits_stored=12))
    no_pixels = dicom_dataset(RAMP12)
    del no_pixels.PixelData
    with pytest.raises(ImageError, match="without pixel data"):
        _decode(no_pixels)
    data = dicom_bytes(dicom_dataset(RAMP12, bits_stored=12))
    with pytest.raises(ImageError, match=r"^cut\.dcm: "):
        decode_gray(data[: len(data) - 1000], name="cut.dcm")  # truncated pixel data
    with pytest.raises(ImageError, match=r"^png\.dcm: "):
        decode_gray(_image_bytes(RAMP12), name="png.dcm")  # the name says DICOM, the content does not
    with pytest.raises(ImageError, match=r"invalid DICOM rescale, LUT or window: .*Window Width"):
        _decode(dicom_dataset(RAMP12, bits_stored=12, WindowCenter=100, WindowWidth=0))
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    with pytest.raises(ImageError, match="11x11 pixels exceeds the limit"):
        _decode(dicom_dataset(np.zeros((11, 11), np.uint8)))


def _damaged(data: bytes, rng: np.random.Generator, start: int, end: int, trials: int) -> list[bytes]:
    """`trials` copies of `data`, each with 4 random bytes in [start, end) overwritten."""
    copies = []
    for _ in range(trials):
        damaged = bytearray(data)
        for i in rng.integers(start, end, 4):
            damaged[i] = rng.integers(0, 256)
        copies.append(bytes(damaged))
    return copies


def test_damaged_dicom_files_give_an_image_error_or_an_image_never_a_crash(capfd):
    # pack skips a file only on ImageError: anything else pydicom or a plugin raises (a garbled VR, a
    # missing element, a panic in the Rust RLE decoder, which is a BaseException) would stop the run.
    rle = dicom_dataset(RAMP12, bits_stored=12, WindowCenter=2048, WindowWidth=1024)
    rle.compress(RLELossless, encoding_plugin="pydicom")
    rle_data, bare = dicom_bytes(rle), dicom_bytes(dicom_dataset(RAMP12, bits_stored=12), part10=False)
    rng = np.random.default_rng(0)
    files = _damaged(rle_data, rng, len(rle_data) - 4000, len(rle_data), 60)  # in the RLE segments
    files += _damaged(bare, rng, 0, 300, 60)  # in the header
    files += [rle_data[:n] for n in range(100, len(rle_data), 250)]  # truncated
    frame = next(generate_frames(rle.PixelData, number_of_frames=1))
    rle.PixelData = encapsulate([(3).to_bytes(4, "little") + frame[4:]])  # 3 RLE segments declared, not 2
    files.append(dicom_bytes(rle))
    reasons = []
    for data in files:
        try:
            gray = decode_gray(data, name="d.dcm")
            assert gray.dtype == np.uint8 and gray.ndim == 2
        except ImageError as e:
            assert e.name == "d.dcm" and "\n" not in str(e)
            reasons.append(e.reason)
    assert any(
        r.startswith("cannot decode the pixel data (RLE Lossless (1.2.840.10008.1.2.5))") for r in reasons
    )
    assert any(r.startswith("not a readable DICOM file") for r in reasons)
    assert any("without pixel data" in r for r in reasons)
    # pylibjpeg-rle printed a Rust panic (138 lines with RUST_BACKTRACE=1) before raising, and pydicom
    # warned about each oddity: an unreadable file is one ImageError and nothing on stderr.
    assert capfd.readouterr().err == ""


def test_image_error_is_an_input_error_that_pickles():
    err = pickle.loads(pickle.dumps(ImageError("a.dcm", "bad")))  # as from a pack worker process
    assert isinstance(err, InputError) and exit_code_for(err) == EXIT_USAGE
    assert (str(err), err.name, err.reason) == ("a.dcm: bad", "a.dcm", "bad")
    assert {".dcm", ".dicom", ".png"} <= set(images.IMAGE_SUFFIXES)


# ---------------------------------------------------------------------------------------- pack, predict


def test_pack_stores_load_gray_of_each_dicom(tmp_path: Path):
    from shard_tools.pack import pack
    from shard_tools.verify import verify

    rng = np.random.default_rng(3)
    src = tmp_path / "src"
    for c in ("COVID", "Normal"):
        for i in range(4):
            pixels = rng.integers(0, 4096, (40, 40), dtype=np.uint16)
            window = {"WindowCenter": 2000, "WindowWidth": 3000} if i % 2 else {}
            write_dicom(
                src / c / f"{c}-{i}.dcm",
                pixels,
                "MONOCHROME1" if i == 3 else "MONOCHROME2",
                bits_stored=12,
                **window,
            )
    m = pack(
        src, tmp_path / "out", size=16, min_shards=1, workers=1, classes=["COVID", "Normal"], progress=False
    )
    assert m["skipped"] == [] and verify(tmp_path / "out") == []
    stored = {}
    for shard in sorted((tmp_path / "out").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {mem.name: tar.extractfile(mem).read() for mem in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                path = json.loads(data)["path"]
                stored[path] = np.asarray(Image.open(io.BytesIO(members[name[:-5] + ".png"])))
    assert len(stored) == 8
    for path, pixels in stored.items():
        np.testing.assert_array_equal(pixels, load_gray(src / path, 16), err_msg=path)


def test_predict_finds_dicom_files_in_folders(tmp_path: Path):
    from cxrdist.cli import find_images

    write_dicom(tmp_path / "in" / "a" / "x.DCM", RAMP12, bits_stored=12)
    write_dicom(tmp_path / "in" / "y.dicom", RAMP12, bits_stored=12)
    (tmp_path / "in" / "notes.txt").write_text("no")
    files, missing = find_images([str(tmp_path / "in")])
    assert sorted(p.name for p in files) == ["x.DCM", "y.dicom"] and missing == []
