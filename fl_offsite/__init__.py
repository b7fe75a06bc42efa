"""fl-offsite: federated Offsite-Tuning on Flower."""

__version__ = "0.1.0"
