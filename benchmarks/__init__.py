"""Benchmarks: scripts that print ratios against a baseline measured in the same run.

`python -m benchmarks` runs them all in one go, `python -m benchmarks --gpu` the GPU check (see
`benchmarks/run.py`); BENCHMARKS.md holds results. Shared pieces live in `benchmarks/common.py`.
"""

import os

# As `cxrdist.train` does (see there): OpenMP threads sleep while they wait, so that compute references
# measured here wait the way training runs do. Set here, in the package, because it only takes effect
# before torch loads, and every benchmark module is imported through this package first. A user's
# setting wins, and then also reaches the plain baseline script.
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
