"""dcgan_dist: distributed, mixed-precision DCGAN training on WebDataset shards."""

__version__ = "0.1.0"
