"""python -m cxrdist.report RUN_DIR [--metrics FILE]: see cxrdist.report."""

import sys

from cxrdist.report import main
from shard_tools.cli import run_main

sys.exit(run_main(main))
