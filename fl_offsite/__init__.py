"""fl-offsite: federated Offsite-Tuning on Flower."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fl-offsite")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
