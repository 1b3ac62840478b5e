"""cxrdist: fast, exact, distributed training of chest X-ray classifiers on WebDataset shards."""

__version__ = "0.1.0"
