"""What the teachers and students read: input arrays (memory-mapped .npy, Parquet, Zarr) joined by
sample id, text and tokenized corpora, the train/test/transfer splits, and augmented views drawn
and rendered from their parameters. Imports only pipeline.core and pipeline.format."""
