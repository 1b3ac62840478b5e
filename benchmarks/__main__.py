"""`python -m benchmarks`: every performance figure in one run, or `--gpu` the GPU check; see run.py."""

import sys

from benchmarks.run import main
from shard_tools.cli import run_main

sys.exit(run_main(main))
