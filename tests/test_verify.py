"""shard_tools.verify: a sound dataset passes; each kind of damage is caught and named."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from rich.console import Console

from shard_tools.cli import run_main
from shard_tools.errors import InputError
from shard_tools.schema import MANIFEST_NAME, ManifestError
from shard_tools.verify import check_checksums, main, read_manifest, sha256_file, summary_table, verify


@pytest.fixture
def shards(synth_shards: Path, tmp_path: Path) -> Path:
    """A private copy of the session's shards, free to damage."""
    return Path(shutil.copytree(synth_shards, tmp_path / "out"))


def _manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST_NAME).read_text())


def _write_manifest(out: Path, manifest: dict) -> None:
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


def test_sound_dataset_passes_and_prints_a_summary(shards: Path, capsys):
    assert verify(shards, workers=2) == []
    assert check_checksums(shards) == []
    assert main([str(shards)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "train" in out and "Lung_Opacity" in out


def test_flipped_byte_is_caught(shards: Path, capsys):
    path = shards / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01  # inside some sample's data
    path.write_bytes(bytes(data))
    problems = verify(shards)
    assert any("train-000001.tar: sha256" in p for p in problems)
    assert check_checksums(shards) == [p for p in problems if "sha256" in p]
    assert main([str(shards)]) == 1
    assert "train-000001.tar: sha256" in capsys.readouterr().err


def test_truncated_shard_is_caught(shards: Path):
    path = shards / "val-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    problems = verify(shards)
    assert any("val-000000.tar" in p and "bytes, manifest says" in p for p in problems)
    assert any("val-000000.tar: truncated or corrupt tar" in p for p in problems)
    assert any("val-000000.tar" in p and "samples, manifest says" in p for p in problems)


def test_missing_and_unlisted_files_are_caught(shards: Path):
    (shards / "test-000000.tar").rename(shards / "test-000099.tar")
    problems = verify(shards)
    assert "test-000000.tar: missing (listed in the manifest)" in problems
    assert "test-000099.tar: in OUT but not listed in the manifest" in problems
    assert any(p.startswith("test: 0 samples of 'COVID' in the shards") for p in problems)


def test_manifest_disagreeing_with_shards_is_caught(shards: Path):
    manifest = _manifest(shards)
    counts = manifest["splits"]["train"]["class_counts"]
    counts["COVID"] += 1
    counts["Normal"] -= 1
    manifest["image_size"] = 128
    _write_manifest(shards, manifest)
    problems = verify(shards)
    assert any(p.startswith("train:") and "'COVID'" in p for p in problems)
    assert any("manifest image_size is 128" in p for p in problems)


def test_wrong_label_inside_a_shard_is_caught(shards: Path):
    # Rewrite one shard with one sample's .cls changed, and its manifest entry updated to match, so only
    # the content check can notice.
    path = shards / "train-000000.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (m, data) in enumerate(members):
            if i == 0:
                assert m.name.endswith(".cls")
                data = str((int(data) + 1) % 4).encode()
            tar.addfile(m, io.BytesIO(data))
    manifest = _manifest(shards)
    entry = manifest["splits"]["train"]["shards"][0]

    entry["bytes"], entry["sha256"] = path.stat().st_size, sha256_file(path)
    _write_manifest(shards, manifest)
    problems = verify(shards)
    assert any("train-000000.tar: sample" in p and "but .json says" in p for p in problems)


def test_missing_manifest_or_out_is_bad_input(tmp_path: Path, capsys):
    # Contract since verify went through run_main: nothing to check against is bad input (exit 2), not a
    # list of problems (exit 1).
    with pytest.raises(InputError, match="nowhere is not a folder"):
        verify(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="manifest.json does not exist"):
        verify(tmp_path / "empty")
    assert run_main(main, [str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "manifest.json does not exist" in err


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: m.update(splits=[]), "splits must map train, val, test to their shards"),
        (lambda m: m["splits"]["val"]["shards"][0].pop("sha256"), "splits.val.shards[0].sha256 must be"),
        (lambda m: m.update(classes="COVID"), "classes must be a non-empty list of class names"),
        (lambda m: m.update(groups={"file": "g.csv"}), "groups.sha256 must be 64 lower-case hex digits"),
    ],
    ids=["splits-list", "no-sha256", "classes-string", "groups-malformed"],
)
def test_malformed_manifest_is_one_line_and_exit_2(shards: Path, damage, message: str, capsys):
    manifest = _manifest(shards)
    damage(manifest)
    _write_manifest(shards, manifest)
    assert run_main(main, [str(shards), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "manifest.json" in lines[0], err
    assert "Traceback" not in err and "problem:" not in err


@pytest.mark.slow
def test_cli_on_a_malformed_manifest_exits_2_without_traceback(shards: Path):
    manifest = _manifest(shards)
    manifest["splits"] = []
    _write_manifest(shards, manifest)
    res = subprocess.run(
        [sys.executable, "-m", "shard_tools.verify", str(shards)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "splits must map" in res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_summary_table_survives_absurd_but_valid_sizes(shards: Path):
    manifest = _manifest(shards)
    manifest["splits"]["test"]["shards"][0]["bytes"] = 10**400  # a whole number: the schema accepts it
    _write_manifest(shards, manifest)
    problems = verify(shards, workers=1)
    assert any("test-000000.tar" in p and "bytes, manifest says" in p for p in problems)
    assert main([str(shards), "--workers", "1"]) == 1
    # The table's MB column in whole-number arithmetic (a float division would overflow here).
    console = Console(record=True, width=400)
    console.print(summary_table(read_manifest(shards), "[title]"))
    text = console.export_text()
    assert "[title]" in text and str(10**400 >> 20)[:30] in text
