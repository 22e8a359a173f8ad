"""The package version: the one source, read by ``sparse_robust.__version__`` and setup.py."""

__version__ = "0.1.0"
