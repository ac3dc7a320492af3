"""The cache on disk: per-row columns, the target encodings, one shard per writer (Zarr v3 or
Parquet), the manifest written last, the reader and the writer for targets computed elsewhere.
Imports only pipeline.core."""
