"""The library version, apart from the package so modules below it (checkpoints) can read it."""

__version__ = "0.1.0"
