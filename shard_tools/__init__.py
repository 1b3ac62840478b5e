"""Turn a folder of chest radiographs into WebDataset shards (see `shard_tools.schema` for the format)."""

__version__ = "0.1.0"
