"""Winnow's library: the pool data model, stages (pure functions of one shard) and the Dask runner."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("winnow")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
