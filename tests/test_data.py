"""cxrdist.data on real (tiny) shards: manifest, exact eval split, fixed-step training, sources, cache."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from servers import serving

import cxrdist.data
from cxrdist.data import (
    DataError,
    eval_batches,
    read_manifest,
    steps_per_epoch,
    to_device,
    train_batches,
)
from cxrdist.device_cache import DeviceCache
from cxrdist.streams import shard_url
from shard_tools.schema import ManifestError

from shardgen import write_shards

TRAIN_SHARDS = [3, 17, 5]  # unequal on purpose
TEST_SHARDS = [7, 5, 4]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    samples = write_shards(out, {"train": TRAIN_SHARDS, "test": TEST_SHARDS})
    return out, samples


def _train(manifest, **overrides):
    args = {"batch_size": 4, "steps": 5, "epoch": 0, "seed": 0, "rank": 0, "world_size": 2}
    args.update({"num_workers": 0, "shuffle_buffer": 8, **overrides})
    return list(train_batches(manifest, **args))


def _eval_keys(manifest, split="test", **kw):
    keys = []
    for images, labels, batch_keys in eval_batches(manifest, split, **kw):
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert images.shape[0] == labels.shape[0] == len(batch_keys)
        keys.extend(batch_keys)
    return keys


# ---------------------------------------------------------------------------------------------- manifest


def test_manifest_from_dir_and_file(shards):
    out, _ = shards
    for source in (str(out), str(out / "manifest.json"), f"file://{out}"):
        m = read_manifest(source)
        assert m.source == str((out / "manifest.json").resolve())
        assert m.classes == ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
        assert m.image_size == 8
        assert m.count("train") == sum(TRAIN_SHARDS)
        assert sum(m.class_counts("train")) == sum(TRAIN_SHARDS)
        assert m.shard_urls("test") == [str(out / f"test-00000{i}.tar") for i in range(3)]
    assert m.shard_urls("val") == []  # every manifest lists all three splits; this one is empty


def test_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(ManifestError, match="no manifest.json"):
        read_manifest(str(tmp_path / "missing"))
    write_shards(tmp_path, {"test": [2]})
    path = tmp_path / "manifest.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(ManifestError, match=r"manifest\.json: format_version is 99"):
        read_manifest(str(tmp_path))
    data["splits"]["test"]["count"] = 3
    data["splits"]["test"]["class_counts"]["COVID"] += 1
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="holding 2 samples, but its count is 3"):
        read_manifest(str(tmp_path))
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="not a JSON manifest"):
        read_manifest(str(path))


# ---------------------------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (2, 2), (3, 1), (5, 2)])
def test_eval_every_sample_exactly_once(shards, world_size, num_workers):
    out, samples = shards
    m = read_manifest(str(out))
    keys = []
    for rank in range(world_size):
        rank_keys = _eval_keys(m, batch_size=3, rank=rank, world_size=world_size, num_workers=num_workers)
        if rank >= len(TEST_SHARDS):
            assert rank_keys == []  # more ranks than shards: nothing, and no error
        keys.extend(rank_keys)
    expected = [k for k, s in samples.items() if s.split == "test"]
    assert len(keys) == len(set(keys)) == m.count("test")
    assert sorted(keys) == sorted(expected)


def test_eval_pixels_and_labels_match_the_shards(shards):
    out, samples = shards
    m = read_manifest(str(out))
    seen = 0
    for images, labels, keys in eval_batches(m, "test", batch_size=4, rank=0, world_size=1, num_workers=0):
        assert images.shape[1:] == (1, 8, 8)
        for image, label, key in zip(images, labels, keys):
            np.testing.assert_array_equal(image[0].numpy(), samples[key].pixels)
            assert int(label) == samples[key].label
            seen += 1
    assert seen == m.count("test")


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_same_steps_on_every_rank_with_unequal_shards(shards, num_workers):
    out, _ = shards
    m = read_manifest(str(out))
    batch_size, world_size = 4, 2
    steps = steps_per_epoch(m.count("train"), batch_size * world_size)
    assert steps == 4  # ceil(25 / 8)
    for rank in range(world_size):
        batches = _train(m, steps=steps, rank=rank, world_size=world_size, num_workers=num_workers)
        assert len(batches) == steps
        for images, labels in batches:
            assert images.shape == (batch_size, 1, 8, 8) and images.dtype == torch.uint8
            assert labels.shape == (batch_size,) and labels.dtype == torch.int64
    # An odd step count across 2 workers: 3 + 2 batches, still exactly 5.
    assert len(_train(m, steps=5, num_workers=2)) == 5
    assert len(_train(m, steps=1, num_workers=2)) == 1


def test_train_is_reproducible(shards):
    out, _ = shards
    m = read_manifest(str(out))

    def labels(**kw):
        return torch.cat([lab for _, lab in _train(m, steps=6, **kw)]).tolist()

    def pixels(**kw):
        return torch.cat([img for img, _ in _train(m, steps=6, **kw)])

    assert torch.equal(pixels(epoch=3), pixels(epoch=3))
    assert torch.equal(pixels(epoch=1, num_workers=2), pixels(epoch=1, num_workers=2))
    assert labels(epoch=3) != labels(epoch=4)
    assert labels(epoch=3, rank=0) != labels(epoch=3, rank=1)
    assert labels(seed=1) != labels(seed=2)


def test_train_draws_every_sample_equally_often(shards):
    """Resampled shards: samples of the 3-sample shard are drawn about as often as those of the 17 one."""
    out, samples = shards
    m = read_manifest(str(out))
    batches = list(
        train_batches(
            m, batch_size=5, steps=200, epoch=0, seed=0, rank=0, world_size=1, num_workers=0, shuffle_buffer=0
        )
    )
    # Recover each drawn sample's shard from its pixels.
    by_pixels = {s.pixels.tobytes(): s.shard for s in samples.values() if s.split == "train"}
    drawn = Counter(by_pixels[img[0].numpy().tobytes()] for images, _ in batches for img in images)
    per_sample = {shard: drawn[shard] / n for shard, n in zip(sorted(drawn), TRAIN_SHARDS)}
    assert max(per_sample.values()) < 1.6 * min(per_sample.values()), per_sample


def test_bad_samples_are_skipped_up_to_the_limit(tmp_path):
    write_shards(
        tmp_path, {"train": [6], "test": [6]}, bad_keys=frozenset({"train_00_00002", "test_00_00003"})
    )
    m = read_manifest(str(tmp_path))
    with pytest.raises(
        DataError, match=r"sample 'train_00_00002' in shard .*train-000000\.tar cannot be decoded"
    ):
        _train(m, steps=2, world_size=1)
    batches = _train(m, steps=4, world_size=1, max_bad_samples=1, num_workers=2)
    assert len(batches) == 4
    with pytest.raises(DataError, match="test_00_00003.*max_bad_samples=0"):
        _eval_keys(m, batch_size=4, rank=0, world_size=1, num_workers=0)
    keys = _eval_keys(m, batch_size=4, rank=0, world_size=1, num_workers=0, max_bad_samples=1)
    assert len(keys) == 5 and "test_00_00003" not in keys


def test_missing_or_truncated_shard_is_named(tmp_path):
    write_shards(tmp_path, {"train": [4, 4], "test": [4, 4]})
    (tmp_path / "test-000001.tar").unlink()
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1500])  # cut inside the first sample's PNG
    m = read_manifest(str(tmp_path))
    # num_workers=0: after a worker's error, torch's DataLoader takes 5 s to shut its workers down.
    with pytest.raises(DataError, match=r"test-000001\.tar: No such file"):
        _eval_keys(m, batch_size=4, rank=0, world_size=1, num_workers=0)
    with pytest.raises(DataError, match=r"shard .*train-000000\.tar: cannot read it") as info:
        _eval_keys(m, "train", batch_size=4, rank=0, world_size=1, num_workers=0)
    assert "BufferedReader" not in str(info.value)  # the reason, not webdataset's raw argument tuple
    # Cut at a member header instead: tarfile says "empty header", with the stream in its arguments.
    shard.write_bytes(shard.read_bytes()[:1024])
    with pytest.raises(DataError, match=r"train-000000\.tar: cannot read it \(ReadError: empty header\)"):
        _eval_keys(m, "train", batch_size=4, rank=0, world_size=1, num_workers=0)


# ---------------------------------------------------------------------------------------------- sources


@pytest.fixture()
def http_root(shards):
    out, _ = shards
    with serving(out) as server:
        yield server.url


def _eval_all(manifest, num_workers=0):
    found = {}
    for images, labels, keys in eval_batches(
        manifest, "test", batch_size=5, rank=0, world_size=1, num_workers=num_workers
    ):
        for image, label, key in zip(images, labels, keys):
            found[key] = (image.numpy().tobytes(), int(label))
    return found


def test_http_shards_load_the_same_samples(shards, http_root):
    out, _ = shards
    local = _eval_all(read_manifest(str(out)))
    remote_manifest = read_manifest(http_root)
    assert remote_manifest.source == http_root + "manifest.json"
    assert remote_manifest.shard_urls("test")[0] == http_root + "test-000000.tar"
    assert _eval_all(remote_manifest, num_workers=2) == local
    assert len(local) == sum(TEST_SHARDS)
    assert len(_train(remote_manifest, steps=3)) == 3
    with pytest.raises(DataError, match="HTTP 404"):
        read_manifest(http_root + "nowhere/")


def test_pipe_shards_load_the_same_samples(shards, tmp_path):
    out, _ = shards
    local = _eval_all(read_manifest(str(out)))
    m = read_manifest(f"pipe:cat {out}/manifest.json")
    assert m.shard_urls("test")[1] == f"pipe:cat {out}/test-000001.tar"
    assert _eval_all(m) == local
    # Training stops mid-shard at the end of the epoch: the command must end quietly.
    assert len(_train(m, steps=2, batch_size=2, num_workers=0)) == 2
    with pytest.raises(DataError, match="exited with status 1"):
        read_manifest(f"pipe:cat {out}/manifest.json && false")
    (tmp_path / "manifest.json").write_bytes((out / "manifest.json").read_bytes())  # shards missing
    with pytest.raises(DataError, match=r"test-000000\.tar: the command exited with status 1"):
        _eval_all(read_manifest(f"pipe:cat {tmp_path}/manifest.json"))
    with pytest.raises(ManifestError, match="must name 'manifest.json'"):
        read_manifest("pipe:cat something")


@pytest.mark.parametrize(
    "hostile",
    ["train-000000.tar; touch PWNED #", "../other/train-000000.tar", "/etc/passwd", "train-000000.tar\n"],
)
def test_a_manifest_cannot_run_commands_or_point_outside_its_folder(shards, tmp_path, hostile):
    """Shard names come from the manifest: a name that is not `{split}-NNNNNN.tar` is refused before any
    shard is opened, for local folders and pipe: commands alike, and nothing is executed."""
    out, _ = shards
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["file"] = hostile
    (copy / "manifest.json").write_text(json.dumps(manifest))
    for source in (str(copy), f"pipe:cd {tmp_path} && cat {copy}/manifest.json"):
        with pytest.raises(ManifestError, match=r"splits\.train\.shards\[0\]\.file .*train-NNNNNN\.tar"):
            read_manifest(source)
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


def test_pipe_commands_get_shard_names_quoted():
    assert shard_url("pipe:cat /x/manifest.json", "train-000001.tar") == "pipe:cat /x/train-000001.tar"
    assert (
        shard_url("pipe:aws s3 cp s3://b/manifest.json -", "a b.tar") == "pipe:aws s3 cp s3://b/'a b.tar' -"
    )
    assert shard_url("https://h/x/manifest.json", "val-000000.tar") == "https://h/x/val-000000.tar"


# ---------------------------------------------------------------------------------------------- cache


def test_device_cache(shards):
    out, samples = shards
    m = read_manifest(str(out))
    assert cxrdist.data.DeviceCache is DeviceCache  # the name it had in cxrdist.data still works
    assert DeviceCache.load(m, "train", "cpu", max_bytes=100) is None  # does not fit: stream instead
    cache = DeviceCache.load(m, "train", "cpu", max_bytes=1 << 20, num_workers=2)
    n = m.count("train")
    assert cache.images.shape == (n, 1, 8, 8) and cache.images.dtype == torch.uint8
    assert cache.keys == sorted(k for k, s in samples.items() if s.split == "train")
    for i, key in enumerate(cache.keys):
        np.testing.assert_array_equal(cache.images[i, 0].numpy(), samples[key].pixels)
        assert int(cache.labels[i]) == samples[key].label

    def rows(rank, world_size, steps, epoch=0, batch_size=4):
        batches = list(
            cache.train_batches(
                batch_size=batch_size, steps=steps, epoch=epoch, seed=0, rank=rank, world_size=world_size
            )
        )
        assert len(batches) == steps
        assert all(img.shape == (batch_size, 1, 8, 8) and lab.shape == (batch_size,) for img, lab in batches)
        # Identify rows by pixels: each cached image is distinct.
        return [img.numpy().tobytes() for images, _ in batches for img in images]

    # Within one permutation ranks are disjoint: 2 ranks x 3 steps x 4 = 24 <= 25 samples.
    r0, r1 = rows(0, 2, 3), rows(1, 2, 3)
    assert len(set(r0) | set(r1)) == 24
    # A full epoch (ceil(25 / 8) = 4 steps) covers every sample, then wraps into the next permutation.
    steps = steps_per_epoch(n, 8)
    assert len(set(rows(0, 2, steps)) | set(rows(1, 2, steps))) == n
    assert rows(0, 2, 3) == r0  # reproducible
    assert rows(0, 2, 3, epoch=1) != r0
    # Same global batch on one rank: the same samples, in the same global order.
    assert sorted(rows(0, 1, 3, batch_size=8)) == sorted(r0 + r1)


def test_to_device_keeps_keys():
    images, labels = torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1])
    moved = to_device((images, labels, ["a", "b"]), torch.device("cpu"))
    assert isinstance(moved, tuple) and moved[2] == ["a", "b"]
    assert torch.equal(moved[0], images)
