"""Seeds: every random stream of a run is derived from the run's seed and the stream's coordinates.

Training draws (shard resampling, the shuffle buffer, the device cache's permutations, augmentation,
dropout) are each seeded from ``(purpose, run seed, epoch, rank, step or worker, ...)``, so a resumed run
replays them exactly and no two ranks, workers or steps share a stream.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from its parts: the same in every process, Python version and run (unlike `hash`,
    which is salted per process). 63 bits fit every generator torch, numpy and `random` accept."""
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
