"""The device cache: a whole split as one uint8 tensor on the training device, batches as index gathers.

Read once through `cxrdist.data.eval_batches` (every sample exactly once), then sorted by key so the
content does not depend on the worker count; training draws seeded permutations there (airbench's way),
evaluation takes rank-strided rows. Data contract as `cxrdist.data`: uint8 ``(B, 1, H, W)`` images and
int64 ``(B,)`` labels, already on the device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch

from cxrdist.data import Manifest, check_rank, eval_batches
from cxrdist.rng import derive_seed
from cxrdist.streams import DataError

log = logging.getLogger(__name__)


class DeviceCache:
    """A whole split as uint8 ``(N, 1, H, W)`` images and int64 ``(N,)`` labels on the training device.

    Read once through `eval_batches` (every sample exactly once), ordered by key so the content does
    not depend on the worker count. Batches are then index gathers on the device, as in airbench.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, keys: list[str]):
        self.images = images  # uint8 (N, 1, H, W) on the device
        self.labels = labels  # int64 (N,) on the device
        self.keys = keys  # WebDataset keys, row order

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def bytes_needed(manifest: Manifest, split: str) -> int:
        """Device memory the split takes in the cache: pixels plus int64 labels."""
        return manifest.count(split) * (manifest.image_size**2 + 8)

    @staticmethod
    def load(
        manifest: Manifest,
        split: str,
        device: torch.device | str,
        max_bytes: int,
        num_workers: int = 0,
        max_bad_samples: int = 0,
    ) -> DeviceCache | None:
        """The cached split, or None (with the reason logged) when it needs more than `max_bytes`.

        Up to `max_bad_samples` undecodable samples in the whole split are logged and left out, as the
        streaming loader would skip them; one more raises `DataError` naming it.
        """
        needed = DeviceCache.bytes_needed(manifest, split)
        if needed > max_bytes:
            log.warning(
                "device cache off: split '%s' needs %.2f GB, more than data.cache_max_gb = %.2f GB; "
                "streaming from the shards instead",
                split,
                needed / 1e9,
                max_bytes / 1e9,
            )
            return None
        n, size = manifest.count(split), manifest.image_size
        images = torch.empty((n, 1, size, size), dtype=torch.uint8)
        labels = torch.empty((n,), dtype=torch.int64)
        keys: list[str] = []
        for batch_images, batch_labels, batch_keys in eval_batches(
            manifest,
            split,
            batch_size=256,
            rank=0,
            world_size=1,
            num_workers=num_workers,
            max_bad_samples=max_bad_samples,
            pin_memory=False,
        ):
            i, j = len(keys), len(keys) + len(batch_keys)
            if j > n:
                raise DataError(f"{manifest.source}: split '{split}' holds more samples than its count {n}")
            images[i:j], labels[i:j] = batch_images, batch_labels
            keys.extend(batch_keys)
        # Workers each allow max_bad_samples; the split as a whole may not lose more than that either.
        if not n - max_bad_samples <= len(keys) <= n:
            raise DataError(
                f"{manifest.source}: split '{split}' gave {len(keys)} readable samples, its count is {n} "
                f"(data.max_bad_samples={max_bad_samples}). Check it with `python -m shard_tools.verify`."
            )
        n = len(keys)
        images, labels = images[:n], labels[:n]
        order = sorted(range(n), key=keys.__getitem__)
        index = torch.tensor(order, dtype=torch.int64)
        return DeviceCache(images[index].to(device), labels[index].to(device), [keys[i] for i in order])

    def eval_batches(
        self, *, batch_size: int, rank: int, world_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """This rank's rows ``rank::world_size`` as (uint8 (B, 1, H, W), int64 (B,), keys) batches already on
        the device, B <= `batch_size`: over all ranks every cached sample exactly once, as `eval_batches`."""
        check_rank(rank, world_size)
        rows = range(rank, len(self), world_size)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            index = torch.arange(chunk.start, chunk.stop, chunk.step, device=self.images.device)
            yield (
                self.images.index_select(0, index),
                self.labels.index_select(0, index),
                [self.keys[i] for i in chunk],
            )

    def train_batches(
        self, *, batch_size: int, steps: int, epoch: int, seed: int, rank: int, world_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Exactly `steps` full batches of (uint8 (B, 1, H, W), int64 (B,)), already on the device.

        All ranks draw the same (seed, epoch) permutations; global step i is the next ``B * world_size``
        indices and rank r takes its r-th slice of them, so ranks are disjoint within a permutation and
        the samples seen do not depend on the world size at a fixed global batch. When the epoch needs
        more than N samples it continues into a fresh permutation, like the streaming loader's random
        draws.
        """
        check_rank(rank, world_size)
        n = len(self)
        if n == 0 and steps > 0:
            raise DataError("the device cache is empty")
        device = self.images.device
        total = steps * batch_size * world_size
        perms = []
        for j in range(math.ceil(total / n) if n else 0):
            g = torch.Generator(device=device)
            g.manual_seed(derive_seed("cache", seed, epoch, j))
            perms.append(torch.randperm(n, generator=g, device=device))
        order = torch.cat(perms) if perms else torch.zeros(0, dtype=torch.int64, device=device)
        for step in range(steps):
            start = (step * world_size + rank) * batch_size
            index = order[start : start + batch_size]
            yield self.images.index_select(0, index), self.labels.index_select(0, index)
