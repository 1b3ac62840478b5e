"""Turn a folder of chest radiographs into WebDataset shards (see `shard_tools.schema` for the format)."""

import sys

__version__ = "0.1.0"

if sys.argv[:1] == ["-m"]:  # `python -m <package>.<command>`, while the command's modules import
    from shard_tools.errors import one_line_stops_at_startup

    one_line_stops_at_startup()
