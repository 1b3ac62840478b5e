"""Reliability without training: flaky HTTP servers, hostile images, tampered shards and checkpoints,
failing saves, garbage recipes, and signals aimed at loader workers. Each test states the fault.

RELIABILITY.md maps every fault to its test; the ones that need real training runs are in
`test_reliability_train.py`.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import io
import json
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from servers import serving

import cxrdist.streams as streams_mod
from cxrdist import artifacts
from cxrdist.config import ConfigError, ModelConfig, load_config
from cxrdist.data import DataError, eval_batches, read_manifest, train_batches
from cxrdist.models import ModelError, create_model
from shard_tools import files
from shard_tools.pack import TooManySkipped, pack
from shard_tools.schema import IMAGENET_MEAN, IMAGENET_STD, MANIFEST_NAME, SPLITS
from shard_tools.verify import verify

from launch import ROOT, quiet_env, run_module
from shardgen import write_shards

# ------------------------------------------------------------------------------------- shared helpers


def shard_keys(shard: Path) -> list[str]:
    with tarfile.open(shard) as t:
        return list(dict.fromkeys(m.name.split(".")[0] for m in t.getmembers()))


def rewrite_shard(shard: Path, drop: str | None = None, replace: dict[str, bytes] | None = None) -> None:
    """Rewrite a tar in place without the sample `drop` and with members in `replace` (name -> bytes);
    update the shard's `bytes` and `sha256` in the manifest beside it (its counts stay as they were), so
    that only a sample count or a decode can notice."""
    with tarfile.open(shard) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as t:
        for m, content in members:
            if drop is not None and m.name.split(".")[0] == drop:
                continue
            content = (replace or {}).get(m.name, content)
            m.size = len(content)
            t.addfile(m, io.BytesIO(content))
    manifest_path = shard.parent / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            if entry["file"] == shard.name:
                entry["bytes"] = shard.stat().st_size
                entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest, indent=2))


def random_model_dir(out: Path, classes: list[str], image_size: int) -> Path:
    """An untrained seed CNN exported like a run's `best/`: enough for predict and evaluate."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="seed_cnn", in_chans=3), len(classes))
    meta = {
        "model": {"name": "seed_cnn", "in_chans": 3},
        "classes": classes,
        "image_size": image_size,
        "normalization": {
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "input": "uint8 gray / 255",
        },
    }
    artifacts.export_model(model.state_dict(), meta, out)
    return out


# --------------------------------------------------------------------------- remote shards over HTTP


@pytest.fixture(scope="module")
def remote_src(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("remote")
    write_shards(out, {"train": [9, 6], "val": [4], "test": [7, 5, 4]}, image_size=32)
    return out


@pytest.fixture()
def server(remote_src: Path, monkeypatch):
    monkeypatch.setattr(streams_mod, "HTTP_BACKOFF_S", 0.02)  # 20, 40, 80 ms: fast, still measurable
    with serving(remote_src) as srv:
        yield srv


def _samples(manifest, split: str = "test", num_workers: int = 0) -> list[tuple[str, bytes, int]]:
    """Every (key, pixels, label) of a split in reading order: duplicates and losses both show."""
    out = []
    for images, labels, keys in eval_batches(
        manifest, split, batch_size=4, rank=0, world_size=1, num_workers=num_workers
    ):
        out += [(k, img.numpy().tobytes(), int(lab)) for k, img, lab in zip(keys, images, labels)]
    return out


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_dropped_connection_continues_with_range_where_it_stopped(remote_src, server, reset):
    """Every test shard's first two responses break after 2500 bytes: the reader continues from the exact
    byte with Range requests; the samples are those of the local shards, none repeated or lost."""
    local = _samples(read_manifest(str(remote_src)))
    server.reset = reset
    shards = [f"/test-00000{i}.tar" for i in range(3)]
    server.cuts = dict.fromkeys(shards, 2)
    remote = _samples(read_manifest(server.url))
    assert remote == local
    for path in shards:
        ranges = server.requests_for(path)
        offsets = [0 if r is None else int(r.removeprefix("bytes=").rstrip("-")) for r in ranges]
        assert len(ranges) == 3 and ranges[0] is None and offsets == sorted(offsets), ranges
        if not reset:  # a FIN delivers everything sent before it, so the offsets are exact
            assert ranges == [None, "bytes=2500-", "bytes=5000-"]


def test_server_ignoring_range_is_reread_and_skipped(remote_src, server):
    """A server that answers Range requests with the whole file (200): the bytes already read are
    skipped, not handed to the tar reader twice."""
    local = _samples(read_manifest(str(remote_src)))
    server.ignore_range = True
    server.cuts = {"/test-000001.tar": 2}
    assert _samples(read_manifest(server.url)) == local
    assert server.requests_for("/test-000001.tar") == [None, "bytes=2500-", "bytes=2500-"]


def test_loader_workers_and_manifest_survive_a_flaky_server(remote_src, server):
    """Training batches through a loader worker, and the manifest, over a server that drops every
    first response and answers 503 twice."""
    server.fail = {"/manifest.json": 2}
    server.cuts = {"/manifest.json": 1, "/train-000000.tar": 1, "/train-000001.tar": 1}
    server.cut_bytes = 700
    manifest = read_manifest(server.url)
    assert manifest.count("test") == 16
    assert len(server.requests_for("/manifest.json")) == 4  # 503, 503, cut, rest of the body
    batches = list(
        train_batches(
            manifest,
            batch_size=5,
            steps=6,
            epoch=0,
            seed=0,
            rank=0,
            world_size=1,
            num_workers=1,
            shuffle_buffer=8,
        )
    )
    assert len(batches) == 6 and all(b[0].shape == (5, 1, 32, 32) for b in batches)
    assert any(r is not None for r in server.requests_for("/train-000000.tar"))


def test_shard_that_always_breaks_fails_after_the_limit_naming_the_url(remote_src, server, monkeypatch):
    """Every response for one shard stops at byte 3000: no progress, so the reader gives up after
    HTTP_ATTEMPTS attempts with growing back-off, and the error names the URL and the byte."""
    monkeypatch.setattr(streams_mod, "HTTP_ATTEMPTS", 4)
    server.stop_at = {"/test-000002.tar": 3000}
    manifest = read_manifest(server.url)
    with pytest.raises(DataError) as info:
        _samples(manifest)
    message = str(info.value)
    assert server.url + "test-000002.tar" in message and "failed 4 times in a row at byte 3000" in message
    log = [(rng, t) for p, rng, t in server.log if p == "/test-000002.tar"]
    assert [rng for rng, _ in log] == [None] + ["bytes=3000-"] * 3
    gaps = [b - a for (_, a), (_, b) in zip(log, log[1:])]
    # back-off 20, 40, 80 ms: the first drop follows progress (20 ms), then the waits double
    assert gaps[1] >= 0.035 and gaps[2] >= 0.07, gaps


def test_shard_replaced_on_the_server_mid_read_is_an_error(remote_src, tmp_path):
    """A shard replaced (same size, new content) between a drop and the retry: continuing would splice
    two files into one stream of silently wrong samples."""
    root = Path(shutil.copytree(remote_src, tmp_path / "root"))
    with serving(root) as srv:
        shard = root / "test-000000.tar"
        srv.cuts = {"/test-000000.tar": 1}
        new_content = bytearray(shard.read_bytes())
        new_content[len(new_content) // 2] ^= 0xFF
        srv.after_cut = {"/test-000000.tar": lambda: shard.write_bytes(new_content)}
        with pytest.raises(DataError, match=r"test-000000\.tar: changed on the server while being read"):
            _samples(read_manifest(srv.url))
        assert srv.requests_for("/test-000000.tar") == [None, "bytes=2500-"]


def test_missing_remote_file_fails_at_once(server):
    with pytest.raises(DataError, match="HTTP 404"):
        read_manifest(server.url + "nowhere/")
    assert len(server.requests_for("/nowhere/manifest.json")) == 1  # a 404 is not retried


@pytest.mark.slow
def test_training_from_a_failing_server_stops_naming_the_url(remote_src, server, tmp_path):
    """A real training process whose train shard always breaks: exit 1 with the URL, no traceback."""
    server.stop_at = {"/train-000000.tar": 3000, "/train-000001.tar": 3000}
    run_dir = tmp_path / "run"
    script = (
        "import sys, cxrdist.streams as s; s.HTTP_BACKOFF_S = 0.02; s.HTTP_ATTEMPTS = 3\n"
        "from cxrdist.train import main; sys.exit(main(sys.argv[1:]))"
    )
    sets = [
        f"run.dir={run_dir}",
        f"data.shards={server.url}",
        "model.name=test_resnet",
        "train.epochs=1",
        "train.per_device_batch_size=4",
        "data.num_workers=1",
        "data.cache=none",
        "train.mixed_precision=no",
    ]
    cmd = [sys.executable, "-c", script, "recipes/demo.toml", *[a for s in sets for a in ("--set", s)]]
    res = subprocess.run(cmd, cwd=ROOT, env=quiet_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"{server.url}train-00000" in res.stderr and "failed 3 times in a row" in res.stderr


# ----------------------------------------------------------------------------- loader worker signals


@pytest.mark.slow
def test_loader_workers_ignore_group_signals_but_not_their_parent(remote_src):
    """Ctrl-C and SIGTERM sent to a whole process group (terminal, scancel, torchrun) must not kill
    loader workers mid-epoch; the training process itself still ends them at shutdown."""
    manifest = read_manifest(str(remote_src))
    batches = train_batches(
        manifest,
        batch_size=2,
        steps=40,
        epoch=0,
        seed=0,
        rank=0,
        world_size=1,
        num_workers=1,
        shuffle_buffer=4,
    )
    first = next(batches)
    (worker,) = psutil.Process().children()
    for sig in ("INT", "TERM"):  # from another process, as the terminal or the launcher would send them
        subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)
    time.sleep(0.3)
    assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
    rest = list(batches)  # the epoch completes
    assert len(rest) == 39 and rest[-1][0].shape == first[0].shape
    worker.wait(timeout=10)  # shut down by its parent when the epoch ends

    # The parent's own SIGTERM (DataLoader and multiprocessing use it at shutdown) still ends a worker.
    batches = train_batches(
        manifest,
        batch_size=2,
        steps=40,
        epoch=1,
        seed=0,
        rank=0,
        world_size=1,
        num_workers=1,
        shuffle_buffer=4,
    )
    next(batches)
    (worker,) = psutil.Process().children()
    # torch's SIGCHLD handler raises in whatever this process is doing when the worker dies.
    with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid \d+\) exited unexpectedly"):
        worker.terminate()  # sent by this process, its parent
        worker.wait(timeout=10)
        list(batches)
    batches.close()


# ------------------------------------------------------------------------------------ hostile images


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int, height: int) -> bytes:
    """A valid-looking 1-bit PNG a few dozen bytes long that declares width x height pixels."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * (1 + width // 8)))
        + _png_chunk(b"IEND", b"")
    )


def _encode(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


# name -> (bytes, the reason it is refused; None when it must be converted and used)
def hostile_images(good: np.ndarray) -> dict[str, tuple[bytes, str | None]]:
    gray = Image.fromarray(good)
    png = _encode(gray)
    text_bomb = png[:-12] + _png_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * (64 << 20))) + png[-12:]
    return {
        "bomb.png": (bomb_png(100_000, 100_000), "decompression bomb"),
        "big.png": (bomb_png(9000, 9000), "exceeds the limit"),  # under PIL's own bomb threshold
        "text_bomb.png": (text_bomb, "corrupt or truncated"),  # 64 MB of zTXt in 64 kB
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "empty.png": (b"", "empty file (0 bytes)"),
        "notes.png": (b"Patient notes, not an image.\n", "not a recognised image"),
        "sixteen.png": (_encode(Image.fromarray(good.astype(np.uint16) * 257)), None),
        "palette.png": (_encode(gray.convert("P")), None),
        "cmyk.jpg": (_encode(gray.convert("CMYK"), "JPEG"), None),
    }


def _good_gray(seed: int, size: int = 120) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size), dtype=np.uint8)


def test_pack_skips_hostile_images_with_reasons_and_packs_the_rest(tmp_path):
    src = tmp_path / "src"
    hostile = hostile_images(_good_gray(0))
    for c, cls in enumerate(("COVID", "Normal")):
        folder = src / cls / "images"
        folder.mkdir(parents=True)
        for i in range(8):
            Image.fromarray(_good_gray(10 * c + i + 1)).save(folder / f"{cls}-{i}.png")
    for name, (content, _) in hostile.items():
        (src / "COVID" / "images" / name).write_bytes(content)
    refused = {name: why for name, (_, why) in hostile.items() if why}

    with pytest.raises(TooManySkipped, match=r"6 of 25 files .* could not be used") as info:
        pack(src, tmp_path / "strict", size=32, min_shards=1, progress=False)
    assert all(name in str(info.value) for name in refused)
    assert not (tmp_path / "strict").exists()

    manifest = pack(src, tmp_path / "out", size=32, min_shards=1, max_skipped=0.5, progress=False)
    skipped = {Path(d["path"]).name: d["reason"] for d in manifest["skipped"]}
    assert skipped.keys() == refused.keys()
    for name, why in refused.items():
        assert why in skipped[name], (name, skipped[name])
    assert sum(manifest["splits"][s]["count"] for s in SPLITS) == 16 + 3
    packed = set()
    for s in SPLITS:
        for entry in manifest["splits"][s]["shards"]:
            with tarfile.open(tmp_path / "out" / entry["file"]) as t:
                for m in t.getmembers():
                    if m.name.endswith(".json"):
                        packed.add(Path(json.loads(t.extractfile(m).read())["path"]).name)
    assert {"sixteen.png", "palette.png", "cmyk.jpg"} <= packed
    assert verify(tmp_path / "out", workers=1) == []


@pytest.mark.slow
def test_predict_reports_each_hostile_image_and_predicts_the_rest(tmp_path):
    model = random_model_dir(tmp_path / "model", ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"], 112)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    hostile = hostile_images(_good_gray(0))
    for name, (content, _) in hostile.items():
        (inbox / name).write_bytes(content)
    for i in range(2):
        Image.fromarray(_good_gray(i + 1)).save(inbox / f"good{i}.png")
    res = run_module("cxrdist.predict", model, inbox, "--json", "--device", "cpu", timeout=120)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    predicted = {Path(r["path"]).name for r in json.loads(res.stdout)}
    converted = {name for name, (_, why) in hostile.items() if why is None}
    assert predicted == {"good0.png", "good1.png"} | converted
    err = " ".join(res.stderr.split())  # rich may wrap long lines
    for name, (_, why) in hostile.items():
        if why:
            assert f"{name}: " in err and why in err, (name, err)
    assert "6 input(s) could not be read; 5 predicted" in err


# ------------------------------------------------------------------------- shards that lost samples


@pytest.mark.slow
def test_evaluate_fails_when_a_shard_really_lost_a_sample(cnn_shards, tmp_path):
    """A test shard repacked without one sample, its checksum updated: the count check catches it."""
    shards = Path(shutil.copytree(cnn_shards, tmp_path / "shards"))
    manifest = json.loads((shards / MANIFEST_NAME).read_text())
    shard = shards / manifest["splits"]["test"]["shards"][0]["file"]
    rewrite_shard(shard, drop=shard_keys(shard)[3])
    expected = manifest["splits"]["test"]["count"]
    model = random_model_dir(tmp_path / "model", manifest["classes"], manifest["image_size"])
    out = tmp_path / "eval.json"
    res = run_module(
        "cxrdist.evaluate", model, "--shards", shards, "--out", out, "--num-workers", "1", timeout=120
    )
    assert res.returncode == 1, res.stderr[-3000:]
    err = " ".join(res.stderr.split())
    assert f"evaluated {expected - 1} samples" in err and f"lists {expected}" in err
    assert "Traceback" not in res.stderr and not out.exists()
    assert any("samples, manifest says" in p for p in verify(shards, workers=1))


@pytest.mark.slow
def test_verify_cli_names_modified_and_truncated_shards(synth_shards, tmp_path):
    shards = Path(shutil.copytree(synth_shards, tmp_path / "shards"))
    modified, truncated = shards / "train-000001.tar", shards / "val-000000.tar"
    content = bytearray(modified.read_bytes())
    content[len(content) // 2] ^= 0xFF
    modified.write_bytes(bytes(content))
    truncated.write_bytes(truncated.read_bytes()[:5000])
    res = run_module("shard_tools.verify", shards, "--workers", "1", timeout=120)
    assert res.returncode == 1
    err = " ".join(res.stderr.split())
    assert "train-000001.tar: sha256" in err and "val-000000.tar: truncated or corrupt tar" in err
    assert "Traceback" not in res.stderr


# ---------------------------------------------------------------------------- checkpoints and saves


class _Payload:
    """Unpickling this runs `open(path, "w")`: what a tampered pickle checkpoint would do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def malicious_torch_file(path: Path, marker: Path) -> Path:
    torch.save({"state": {}, "param_groups": [], "x": _Payload(marker)}, path)
    return path


def test_malicious_pickle_payload_is_live_but_never_loaded(tmp_path):
    """The payload works (plain torch.load runs it); every loader cxrdist uses refuses it."""
    live, marker = tmp_path / "live", tmp_path / "pwned"
    torch.load(malicious_torch_file(tmp_path / "live.pth", live), weights_only=False)
    assert live.exists(), "the test payload must be able to create a file"

    evil = malicious_torch_file(tmp_path / "evil.pth", marker)
    with pytest.raises(ModelError, match="cannot read a state dict"):
        create_model(ModelConfig(name="test_resnet", pretrained=True, pretrained_file=str(evil)), 4)
    from accelerate.utils import load as accelerate_load  # what Accelerator.load_state uses

    with pytest.raises(pickle.UnpicklingError):
        accelerate_load(evil)
    assert not marker.exists()


def unsafe_loads(source: str, name: str = "<src>") -> list[str]:
    """Calls in `source` that could unpickle an untrusted file, found in the syntax tree (so a call split
    over lines, or written through an alias, is still seen): torch.load without weights_only=True,
    pickle.load(s), and Accelerate's register_for_checkpointing (whose objects it unpickles freely)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        weights_only = any(
            k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in node.keywords
        )
        if (called == "load" and owner == "torch" and not weights_only) or (
            called in ("load", "loads", "Unpickler") and owner in ("pickle", "cPickle", "dill")
        ):
            found.append(f"{name}:{node.lineno}: {called}")
        if called == "register_for_checkpointing":
            found.append(f"{name}:{node.lineno}: {called}")
    return found


def test_no_code_path_unpickles_untrusted_files():
    """Static guard: package code loads tensors only with safetensors or torch.load(weights_only=True)."""
    offenders = []
    for path in sorted((ROOT / "cxrdist").glob("*.py")) + sorted((ROOT / "shard_tools").glob("*.py")):
        offenders += unsafe_loads(path.read_text(), path.name)
    assert offenders == []
    # The guard itself sees what a line-by-line grep would miss.
    split_call = "import torch\nx = torch.load(\n    path,\n    map_location='cpu',\n)\n"
    assert unsafe_loads(split_call) == ["<src>:2: load"]
    assert unsafe_loads("import torch\ntorch.load(p, weights_only=True)\n") == []
    assert unsafe_loads("import torch\ntorch.load(p, weights_only=False)\n") == ["<src>:2: load"]
    assert unsafe_loads("import pickle\npickle.loads(b)\n") == ["<src>:2: loads"]
    assert unsafe_loads("acc.register_for_checkpointing(obj)\n") == ["<src>:1: register_for_checkpointing"]


def test_failed_model_export_keeps_the_previous_best(tmp_path, monkeypatch):
    """Disk full while writing best/: an ArtifactError, the old best/ intact, no temporary left."""
    best = tmp_path / "run" / "best"
    artifacts.export_model({"w": torch.ones(3)}, {"epoch": 1}, best)
    before = {p.name: p.read_bytes() for p in best.iterdir()}

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts, "save_file", disk_full)
    with pytest.raises(artifacts.ArtifactError, match="No space left on device.*previous one is unchanged"):
        artifacts.export_model({"w": torch.zeros(3)}, {"epoch": 2}, best)
    assert {p.name: p.read_bytes() for p in best.iterdir()} == before
    assert sorted(p.name for p in best.parent.iterdir()) == ["best"]


def test_replace_dir_puts_the_old_directory_back_when_the_rename_fails(tmp_path, monkeypatch):
    final, tmp = tmp_path / "best", tmp_path / ".best.tmp"
    final.mkdir()
    (final / "a").write_text("old")
    tmp.mkdir()
    (tmp / "a").write_text("new")
    real_replace = files.os.replace

    def fail_second(src, dst):
        if Path(src) == tmp:
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", fail_second)
    with pytest.raises(OSError, match="Input/output"):
        files.replace_dir(tmp, final)
    assert (final / "a").read_text() == "old"


# --------------------------------------------------------------------------------- recipes and CLI


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_fuzzed_recipe_files_only_ever_raise_config_error(tmp_path, content):
    """Arbitrary bytes as a recipe file (invalid UTF-8, NULs, half TOML): ConfigError or a Config."""
    path = tmp_path / "fuzz.toml"
    path.write_bytes(content)
    try:
        load_config(path)
    except ConfigError as e:
        assert str(e).startswith(str(path))


def test_recipe_that_is_a_directory_or_has_a_nul_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="recipes"):
        load_config(ROOT / "recipes")
    with pytest.raises(ConfigError, match=r"\[run\] dir: contains a NUL"):
        load_config(None, ['run.dir="runs/a\\u0000b"'])


@pytest.mark.slow
def test_cli_garbage_recipes_and_overrides_exit_2_without_traceback(tmp_path, capsys):
    """The CLI's answer to broken input: exit status 2 and the message, never a traceback. Two real
    processes; the other cases call the same `main` in this process (it returns before any training)."""
    from cxrdist.train import main

    bad_utf8 = tmp_path / "latin1.toml"
    bad_utf8.write_bytes("[run]\ndir = 'r\xe9sum\xe9'\n".encode("latin-1"))
    wrong_type = tmp_path / "wrong.toml"
    wrong_type.write_text("[train]\nepochs = [1, 2]\n[data]\nshards = 3\n")
    for argv, fragment in [
        ([str(bad_utf8)], "latin1.toml: not UTF-8"),
        (["recipes/cnn.toml", "--set", "train=3"], "section.key=value"),
    ]:
        res = run_module("cxrdist.train", *argv, timeout=120)
        err = " ".join(res.stderr.split())
        assert res.returncode == 2 and "config error" in err and fragment in err, (argv, err[-2000:])
        assert "Traceback" not in err, (argv, err[-2000:])
    for argv, fragment in [
        ([str(wrong_type)], "[train] epochs: expected an integer"),
        ([str(ROOT / "recipes")], "cannot read the recipe"),
        ([str(ROOT / "recipes/cnn.toml"), "--set", "optim.lr=-1"], "[optim] lr: must be > 0"),
        ([str(ROOT / "recipes/cnn.toml"), "--set", "data.nope=1"], "unknown key 'data.nope'"),
        ([str(ROOT / "recipes/cnn.toml"), "--set", 'run.dir="a\\u0000"'], "contains a NUL"),
        ([str(ROOT / "recipes/cnn.toml"), "--set", "augment.crop_scale=[2.0, -1.0]"], "[augment] crop_scale"),
    ]:
        assert main(argv) == 2, argv
        err = " ".join(capsys.readouterr().err.split())
        assert "config error" in err and fragment in err, (argv, err)
