"""The cache on disk: per-row columns, the target encodings (encodings/), the shard backends
behind one interface (backends/: a Zarr v3 group or a Parquet file per shard), one shard per
writer, the manifest written last, the reader and the writer for targets computed elsewhere.
Imports only pipeline.core."""
