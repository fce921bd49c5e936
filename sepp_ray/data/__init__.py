"""Image sources, ingest into Parquet shards, and reading them back."""
