"""One shard on disk: the tar layout pack writes, its size in bytes before writing, and samples per shard.

A shard is a POSIX ustar archive of `<key>.cls`, `<key>.json`, optionally `<key>.mask.png`, and
`<key>.png` members per sample (`shard_tools.schema`), in that order, with no timestamps, owners or
modes that vary: the same members give the same bytes. Each member takes a 512-byte header block plus
its data padded to whole blocks; two zero blocks end the archive, which tarfile pads to a 10 KiB record.
`sample_tar_bytes` and `tar_bytes` compute those sizes exactly, so `shard_counts` can honour a byte cap
before anything is written.
"""

from __future__ import annotations

import io
import itertools
import math
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shard_tools.verify import sha256_file

TAR_BLOCK = tarfile.BLOCKSIZE  # 512
TAR_RECORD = tarfile.RECORDSIZE  # a tar file is padded to a multiple of this


def _padded(n: int) -> int:
    """`n` bytes of member data padded to whole tar blocks."""
    return -(-n // TAR_BLOCK) * TAR_BLOCK


def sample_tar_bytes(cls: bytes, meta: bytes, png_length: int, mask_length: int = 0) -> int:
    """Bytes the sample takes in a tar: a header block per member plus its data padded to blocks."""
    mask = TAR_BLOCK + _padded(mask_length) if mask_length else 0
    return 3 * TAR_BLOCK + _padded(len(cls)) + _padded(len(meta)) + _padded(png_length) + mask


def tar_bytes(sample_bytes: Sequence[int]) -> int:
    """Bytes of a tar holding samples of these sizes: two zero blocks end the archive, and tarfile pads
    the file to a whole record."""
    return -(-(sum(sample_bytes) + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


def shard_counts(
    sample_bytes: Sequence[int], shard_size: int, max_shard_bytes: int, min_shards: int
) -> list[int]:
    """Samples per shard for one split (in order): as few shards as `shard_size`, the byte cap and
    `min_shards` allow, never more shards than samples, sizes differing by at most one sample."""
    n = len(sample_bytes)
    if n == 0:
        return []
    k = max(math.ceil(n / shard_size), math.ceil(tar_bytes(sample_bytes) / max_shard_bytes), min_shards)
    k = min(k, n)
    while True:
        counts = [n // k + (1 if i < n % k else 0) for i in range(k)]
        starts = np.cumsum([0, *counts])
        if k == n or all(
            tar_bytes(sample_bytes[a:b]) <= max_shard_bytes for a, b in itertools.pairwise(starts)
        ):
            return counts
        k += 1


def write_shard(path: Path, members: Sequence[tuple[str, bytes]]) -> tuple[int, str]:
    """Write a tar of (name, data) members in the given order, with no timestamps or owners (so the
    bytes depend on the content only); return its size and sha256."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return path.stat().st_size, sha256_file(path)
