"""Shards to batches: the manifest, and the training and evaluation loaders.

Data contract of every loader here (host side, before `to_device`):

- images: ``torch.uint8`` ``(B, 1, H, W)``, gray levels 0..255 exactly as stored in the shard's PNG,
  ``H = W = manifest.image_size``. No float on the host: conversion and normalisation happen once, on the
  device, in `cxrdist.augment`.
- labels: ``torch.int64`` ``(B,)``, ids into ``manifest.classes`` (``classes[i]`` has label ``i``).
- keys (evaluation only): ``list[str]`` of the samples' WebDataset keys, unique within a dataset.
- masks (evaluation with ``masks=True`` only, for shards whose manifest says ``"masks": true``):
  ``torch.bool`` ``(B, 1, H, W)``, True = lung field, from each sample's ``<key>.mask.png``.

Shards are byte streams from `cxrdist.streams`: local paths, ``http(s)://`` URLs, ``pipe:`` commands. The
manifest says which shards make up a split; `read_manifest` validates it (`shard_tools.schema`) and
resolves shard names against the place it was read from, so a copy of the shard folder works the same on
disk, over HTTP or in a bucket.

Distribution is explicit (rank and world size are plain arguments; nothing here imports Accelerate):

- `train_batches`: every rank and every worker resamples shards independently, with its own seed, and
  the epoch is a fixed number of steps, the same on every rank, so no rank waits forever at a collective.
- `eval_batches`: shards split by rank, then by worker; each sample is yielded exactly once in total.
- `cxrdist.device_cache.DeviceCache`: the whole split as one uint8 tensor on the training device,
  shuffled there (read once through `eval_batches`).

Do not pass these loaders to ``accelerator.prepare``: Accelerate would either read everything on rank 0
and broadcast it (dispatch mode) or split the already split stream again and silently drop part of it
(accelerate issue #3547). Move batches with `to_device` instead.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import signal
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from cxrdist.rng import derive_seed
from cxrdist.streams import DataError, manifest_location, open_url, shard_url
from shard_tools.schema import MASK_EXT, ManifestError, has_masks, parse_manifest

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json`` (see `shard_tools.schema`) and the place it was read from.

    `source` is the manifest's own location: a local path, an http(s) URL or a ``pipe:`` command.
    Shard names in the manifest are resolved against it.
    """

    source: str
    classes: tuple[str, ...]
    image_size: int
    data: dict

    def _split(self, split: str) -> dict:
        splits = self.data["splits"]
        if split not in splits:
            raise ManifestError(f"{self.source}: no split '{split}'; the manifest has {', '.join(splits)}")
        return splits[split]

    def shard_urls(self, split: str) -> list[str]:
        """The split's shards in manifest order: local paths, http(s) URLs or ``pipe:`` commands."""
        return [shard_url(self.source, shard["file"]) for shard in self._split(split)["shards"]]

    def count(self, split: str) -> int:
        """Number of samples in the split."""
        return int(self._split(split)["count"])

    @property
    def has_masks(self) -> bool:
        """Every sample holds its lung mask (``"masks": true``; absent in older manifests: False)."""
        return has_masks(self.data)

    def class_counts(self, split: str) -> list[int]:
        """Samples per class in the split, in label order."""
        counts = self._split(split).get("class_counts", {})
        return [int(counts.get(name, 0)) for name in self.classes]


def read_manifest(source: str) -> Manifest:
    """Read and check a manifest.

    `source`: a shard folder, a path to ``manifest.json``, an http(s) URL of either, or a ``pipe:``
    command printing the manifest (``pipe:aws s3 cp s3://bucket/x/manifest.json -``).
    Raises `DataError` naming the source when it is missing, not JSON or not format version 1.
    """
    location = manifest_location(source)
    try:
        with open_url(location) as f:
            raw = f.read()
    except DataError:
        raise
    except Exception as e:  # OSError, http.client.IncompleteRead, ...
        raise DataError(f"{location}: cannot read the manifest: {e}") from e
    data = parse_manifest(raw, location)
    return Manifest(location, tuple(data["classes"]), int(data["image_size"]), data)


# --------------------------------------------------------------------------------------------------
# Samples: tar -> raw samples -> decoded (image, label, key) -> batches


def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader worker running this, (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _wanted(fname: str) -> bool:
    return not fname.endswith(".json")  # provenance: not needed to train or evaluate, so not read


def _reason(e: BaseException) -> str:
    """An exception's own message. webdataset appends the stream and the URL to `args`, so `str(e)` would
    print a Python tuple; the URL is in our message already."""
    first = e.args[0] if e.args else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _raw_samples(urls: Iterable[str]) -> Iterator[dict]:
    """WebDataset samples ``{"__key__", "__url__", "png": bytes, "cls": bytes}`` of each shard in turn."""
    for url in urls:
        stream = open_url(url)
        try:
            yield from group_by_keys(
                tar_file_expander([{"url": url, "stream": stream}], select_files=_wanted)
            )
        except DataError:
            raise  # from the stream itself (HTTP, pipe): already names the URL
        except Exception as e:  # tar, network (IncompleteRead is no OSError): all name the shard
            raise DataError(f"shard {url}: cannot read it ({_reason(e)}): truncated or corrupt?") from e
        finally:
            stream.close()


def _gray_png(data: bytes, member: str, image_size: int) -> np.ndarray:
    """An 8-bit gray PNG member as uint8 (H, W), checked against the manifest's size."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode != "L":
                raise ValueError(f"expected an 8-bit grayscale (L) PNG in .{member}, got mode {im.mode}")
            pixels = np.array(im)  # a writable copy, (H, W) uint8
    except UnidentifiedImageError:
        raise ValueError(f"its .{member} member is not an image PIL can read") from None
    if pixels.shape != (image_size, image_size):
        raise ValueError(
            f".{member} is {pixels.shape[1]}x{pixels.shape[0]} px, the manifest says {image_size}"
        )
    return pixels


def _decode(sample: dict, image_size: int, num_classes: int, masks: bool = False) -> tuple:
    """One raw sample -> (uint8 (1, H, W), label id, key), plus its lung mask bool (1, H, W) when `masks`.
    Raises ValueError saying what is wrong."""
    if "png" not in sample or "cls" not in sample or (masks and MASK_EXT not in sample):
        members = sorted(k for k in sample if not k.startswith("__"))
        wanted = ".png, .cls and .mask.png" if masks else ".png and .cls"
        raise ValueError(f"expected {wanted} members, found {members}")
    pixels = _gray_png(sample["png"], "png", image_size)
    label = int(sample["cls"].decode("ascii").strip())
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} is outside 0..{num_classes - 1}")
    item = (torch.from_numpy(pixels).unsqueeze(0), label, sample["__key__"])
    if masks:  # 255 = lung field, 0 = not (shard_tools.schema); pack binarised it already
        lung = _gray_png(sample[MASK_EXT], MASK_EXT, image_size) >= 128
        item += (torch.from_numpy(lung).unsqueeze(0),)
    return item


def _decoded(
    samples: Iterable[dict], image_size: int, num_classes: int, max_bad: int, masks: bool = False
) -> Iterator[tuple]:
    """Decode samples, skipping and logging up to `max_bad` distinct undecodable ones (per worker).

    The limit counts distinct (shard, key) pairs seen by this worker: a resampled bad sample drawn twice
    counts once, so a dataset with at most `max_bad` bad samples never fails, whatever the worker count.
    """
    bad: set[tuple[str, str]] = set()
    for sample in samples:
        try:
            item = _decode(sample, image_size, num_classes, masks)
        except Exception as e:
            key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
            if (url, key) not in bad:
                bad.add((url, key))
                if len(bad) > max_bad:
                    raise DataError(
                        f"sample '{key}' in shard {url} cannot be decoded: {e}. That makes {len(bad)} bad "
                        f"sample(s), more than data.max_bad_samples={max_bad}. Check the shards with "
                        "`python -m shard_tools.verify`, or raise data.max_bad_samples to skip them."
                    ) from e
                log.warning("skipping undecodable sample %s in shard %s: %s", key, url, e)
            continue
        yield item


def _batches(items: Iterable[tuple], batch_size: int, partial: bool) -> Iterator[tuple]:
    """Collate in the worker: (uint8 (B, 1, H, W), int64 (B,), keys), plus bool (B, 1, H, W) masks when
    the items carry them."""
    it = iter(items)
    while True:
        chunk = list(islice(it, batch_size))
        if not chunk or (len(chunk) < batch_size and not partial):
            return
        images, labels, keys, *masks = zip(*chunk)
        batch = (torch.stack(images), torch.tensor(labels, dtype=torch.int64), list(keys))
        yield batch + tuple(torch.stack(m) for m in masks)
        if len(chunk) < batch_size:
            return


def _shuffled(items: Iterable[Any], bufsize: int, rng: random.Random, needed: int) -> Iterator[Any]:
    """`needed` items through a shuffle buffer of up to `bufsize`, reading exactly `needed` items.

    webdataset's `shuffle` schedule (a quick start of 100, then two reads per pick until the buffer is
    full, then one), with one change: the buffer never holds more than the epoch still needs. A plain
    buffer would end every epoch with `bufsize` samples read and decoded for nothing, in every worker.
    Items are decoded samples, so a skipped bad sample cannot leave the epoch short.
    """
    items = iter(items)
    buf: list[Any] = []
    for done in range(needed):
        room = min(bufsize, needed - done)
        for _ in range(2 if done else min(100, room)):
            if len(buf) >= room:
                break
            buf.append(next(items))
        k = rng.randrange(len(buf))
        buf[k], buf[-1] = buf[-1], buf[k]
        yield buf.pop()


def _no_worker_seed() -> int:
    return 0  # our seed already holds (seed, epoch, rank, worker); see _TrainStream


@dataclass(frozen=True)
class _Failure:
    """A `DataError` raised in a loader worker, sent to the owning process as an item.

    Raised in the worker, DataLoader would re-raise it with the worker's whole traceback pasted into the
    message; a user needs only the message, which names the shard and the sample.
    """

    message: str


def _unwrap(loader: Iterable[Any]) -> Iterator[Any]:
    for item in loader:
        if isinstance(item, _Failure):
            raise DataError(item.message)
        yield item


class _ShardStream(IterableDataset):
    """What the training and evaluation streams share: shard URLs decoded at the manifest's image size with
    its K labels, in batches of `batch_size`, up to `max_bad_samples` bad samples skipped per worker. Runs
    in each DataLoader worker (or the main process)."""

    def __init__(self, urls: list[str], manifest: Manifest, batch_size: int, max_bad_samples: int) -> None:
        super().__init__()
        self.urls = list(urls)
        # Sizes, not the manifest: the stream is pickled into every loader worker.
        self.image_size, self.num_classes = manifest.image_size, len(manifest.classes)
        self.batch_size, self.max_bad_samples = batch_size, max_bad_samples

    def decoded(self, samples: Iterable[dict], masks: bool = False) -> Iterator[tuple]:
        return _decoded(samples, self.image_size, self.num_classes, self.max_bad_samples, masks)

    @staticmethod
    def failure_as_item(batches: Iterable[tuple]) -> Iterator[Any]:
        """`batches`, ended by a `_Failure` item when reading raises `DataError` (see `_Failure`)."""
        try:
            yield from batches
        except DataError as e:
            yield _Failure(str(e))


class _TrainStream(_ShardStream):
    """One rank's training batches: exactly `steps` of them, resampled from the shards."""

    def __init__(
        self,
        urls: list[str],
        manifest: Manifest,
        batch_size: int,
        max_bad_samples: int,
        *,
        steps: int,
        seed: int,
        epoch: int,
        rank: int,
        shuffle_buffer: int,
    ):
        super().__init__(urls, manifest, batch_size, max_bad_samples)
        self.steps, self.shuffle_buffer = steps, shuffle_buffer
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, num_workers = _worker()
        # Worker w makes steps // W batches, plus one for the first steps % W workers: exactly `steps` in
        # total, delivered round-robin by the DataLoader in a fixed order.
        my_steps = self.steps // num_workers + (worker < self.steps % num_workers)
        if my_steps == 0:
            return
        ident = (self.seed, self.epoch, self.rank, worker)
        # webdataset's resampled=True: shards drawn uniformly with replacement, forever. Each draw yields
        # the whole shard, so every sample is equally likely whatever the shard sizes. Its default seed
        # mixes in the pid and the clock; ours makes the draws a function of `ident`.
        shards = wds.ResampledShards(
            self.urls, seed=derive_seed("shards", *ident), worker_seed=_no_worker_seed, deterministic=True
        )
        items = self.decoded(_raw_samples(shard["url"] for shard in shards))
        needed = my_steps * self.batch_size
        if self.shuffle_buffer > 0:
            items = _shuffled(
                items, self.shuffle_buffer, random.Random(derive_seed("buffer", *ident)), needed
            )
        batches = _batches(islice(items, needed), self.batch_size, partial=False)
        yield from self.failure_as_item((images, labels) for images, labels, _keys in batches)


class _EvalStream(_ShardStream):
    """One rank's evaluation batches over its own shards, split again across workers."""

    def __init__(
        self, urls: list[str], manifest: Manifest, batch_size: int, max_bad_samples: int, masks: bool = False
    ):
        super().__init__(urls, manifest, batch_size, max_bad_samples)
        self.masks = masks

    def __iter__(self) -> Iterator[tuple]:
        worker, num_workers = _worker()
        items = self.decoded(_raw_samples(self.urls[worker::num_workers]), self.masks)
        yield from self.failure_as_item(_batches(items, self.batch_size, partial=True))


def _worker_signals(_worker_id: int) -> None:
    """Loader workers ignore Ctrl-C and SIGTERM from anyone but their own process (`worker_init_fn`).

    Ctrl-C, `scancel`, a spot-instance shutdown and torchrun all signal whole process groups. A worker
    killed by one would make its training process fail at the next batch instead of finishing its step
    and saving a checkpoint. The owning process still ends its workers with SIGTERM (DataLoader shutdown,
    multiprocessing at exit), so SIGTERM cannot simply be ignored: a thread waits for it and exits the
    worker only when the sender is the worker's parent. A worker whose parent died exits by itself
    (DataLoader's watchdog).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: no sender information, keep the default
        return
    # Blocked here, the mask is inherited by threads started later; the waiting thread then takes it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_parent_sigterm, name="sigterm-from-parent", daemon=True).start()


def _exit_on_parent_sigterm() -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == os.getppid():
            os._exit(128 + signal.SIGTERM)


def _loader(dataset: IterableDataset, num_workers: int, pin_memory: bool | None) -> DataLoader:
    # batch_size=None: the workers already yield whole batches.
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
        worker_init_fn=_worker_signals if num_workers > 0 else None,
    )


# --------------------------------------------------------------------------------------------------
# Public loaders


def steps_per_epoch(count: int, global_batch_size: int) -> int:
    """Optimizer-independent steps per epoch: ``ceil(count / global_batch_size)``, the same on every rank."""
    if global_batch_size <= 0 or count < 0:
        raise ValueError(f"need count >= 0 and global_batch_size > 0, got {count}, {global_batch_size}")
    return math.ceil(count / global_batch_size)


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size})")


def train_batches(
    manifest: Manifest,
    *,
    batch_size: int,
    steps: int,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    num_workers: int,
    shuffle_buffer: int,
    max_bad_samples: int = 0,
    split: str = "train",
    pin_memory: bool | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Exactly `steps` full batches of (uint8 (B, 1, H, W), int64 (B,)) for this rank, B = `batch_size`.

    Each worker of each rank draws shards uniformly with replacement (webdataset's ``resampled=True``:
    every sample equally likely) and shuffles decoded samples through a buffer of up to `shuffle_buffer`
    (``shuffle_buffer * H * W`` bytes per worker). Both are seeded from (seed, epoch, rank, worker), so
    the batches are a function of those plus the worker count and the buffer size. `steps` is
    normally `steps_per_epoch(manifest.count("train"), batch_size * world_size)`: identical on every
    rank, whatever the shard sizes. Up to `max_bad_samples` distinct undecodable samples per worker are
    logged and skipped; one more raises `DataError`. `pin_memory=None` pins when CUDA is available.
    """
    check_rank(rank, world_size)
    if batch_size < 1 or steps < 0:
        raise ValueError(f"need batch_size >= 1 and steps >= 0, got {batch_size}, {steps}")
    if steps == 0:
        return
    urls = manifest.shard_urls(split)
    if not urls or manifest.count(split) == 0:
        raise DataError(f"{manifest.source}: split '{split}' has no samples to train on")
    dataset = _TrainStream(
        urls,
        manifest,
        batch_size,
        max_bad_samples,
        steps=steps,
        seed=seed,
        epoch=epoch,
        rank=rank,
        shuffle_buffer=shuffle_buffer,
    )
    n = 0
    for batch in _unwrap(_loader(dataset, min(num_workers, steps), pin_memory)):
        yield batch
        n += 1
    if n != steps:  # cannot happen unless a worker died quietly; a short epoch would hang the other ranks
        raise DataError(f"rank {rank}: the training loader made {n} batches instead of {steps}")


def eval_batches(
    manifest: Manifest,
    split: str,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    max_bad_samples: int = 0,
    pin_memory: bool | None = None,
    masks: bool = False,
) -> Iterator[tuple]:
    """This rank's share of `split` as (uint8 (B, 1, H, W), int64 (B,), keys), B <= `batch_size`; with
    `masks`, each batch also carries the samples' lung masks, bool (B, 1, H, W) (the manifest must say
    ``"masks": true``: `Manifest.has_masks`; a sample without one is undecodable).

    Shards go to ranks as ``shards[rank::world_size]``, then to workers as ``mine[worker::workers]``: no
    resampling, no padding, so over all ranks and workers each sample is yielded exactly once. A rank
    with no shard (more ranks than shards) yields nothing; it must still join the metric reductions.
    Any undecodable sample raises `DataError` unless `max_bad_samples` allows skipping it (then the
    evaluation is no longer complete, and the count check in `cxrdist.evaluate` says so).
    """
    check_rank(rank, world_size)
    if batch_size < 1:
        raise ValueError(f"need batch_size >= 1, got {batch_size}")
    if masks and not manifest.has_masks:
        raise ValueError(f"{manifest.source}: the manifest does not say its samples hold lung masks")
    mine = manifest.shard_urls(split)[rank::world_size]
    if not mine:
        return
    dataset = _EvalStream(mine, manifest, batch_size, max_bad_samples, masks)
    # A worker without a shard would only cost a process start.
    yield from _unwrap(_loader(dataset, min(num_workers, len(mine)), pin_memory))


def sample_paths(manifest: Manifest, split: str) -> dict[str, str]:
    """Each sample's source path as recorded by pack (relative to the packed folder: ``<Class>/...``), by
    key: the provenance members the loaders skip. For joining per-image tables (subgroups) to samples."""
    return {key: str(record["path"]) for key, record in sample_provenance(manifest, split).items()}


def sample_provenance(manifest: Manifest, split: str) -> dict[str, dict]:
    """Each sample's ``.json`` provenance record by key (``path``, and ``group`` / ``source`` when pack
    recorded them: `shard_tools.schema`). Raises `DataError` for a record without a readable ``path``."""
    records = {}
    for url in manifest.shard_urls(split):
        stream = open_url(url)
        try:
            members = tar_file_expander(
                [{"url": url, "stream": stream}], select_files=lambda f: f.endswith(".json")
            )
            for sample in group_by_keys(members):
                try:
                    record = json.loads(sample["json"])
                    records[sample["__key__"]] = {**record, "path": str(record["path"])}
                except (KeyError, ValueError, TypeError) as e:
                    raise DataError(
                        f"shard {url}: sample {sample.get('__key__')} has no readable .json path ({e})"
                    ) from None
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"shard {url}: cannot read it ({_reason(e)}): truncated or corrupt?") from e
        finally:
            stream.close()
    return records


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Tensors in `batch` (a tensor, or a tuple / list nesting them) moved with non-blocking copies.

    Anything else (the keys of an evaluation batch) is returned as it is.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in batch):
        return type(batch)(to_device(x, device) for x in batch)
    return batch


def __getattr__(name: str) -> Any:
    """`cxrdist.data.DeviceCache`, where it lived before `cxrdist.device_cache` (which builds on this
    module's `eval_batches`, so it cannot be imported here at load)."""
    if name == "DeviceCache":
        from cxrdist.device_cache import DeviceCache

        return DeviceCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
