"""`DataError`: data that does not fit the run. Its own module so that the data sources (`datasets`), the
encoders (`encoders`) and the shard writer (`write_shards`) raise the same error without importing each other.
It is bad input: exit code 2 (`flowmap_jax.cli.cli_exit`)."""

from flowmap_jax.cli.cli_exit import BadInput


class DataError(BadInput, ValueError):
    """Data that does not fit the run (wrong shape, missing files, bad format)."""
