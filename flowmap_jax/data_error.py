"""`DataError`: data that does not fit the run. Its own module so that the data sources (`datasets`), the
encoders (`encoders`) and the shard writer (`write_shards`) raise the same error without importing each other."""


class DataError(ValueError):
    """Data that does not fit the run (wrong shape, missing files, bad format)."""
