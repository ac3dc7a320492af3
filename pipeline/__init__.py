"""logitcache: run a teacher ensemble once, cache its soft targets, train many students from the cache."""

__version__ = "0.1.0"
