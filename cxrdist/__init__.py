"""cxrdist: fast, exact, distributed training of chest X-ray classifiers on WebDataset shards."""

import sys

__version__ = "0.1.0"

if sys.argv[:1] == ["-m"]:  # `python -m <package>.<command>`, while the command's modules import
    from shard_tools.errors import one_line_stops_at_startup

    one_line_stops_at_startup()
