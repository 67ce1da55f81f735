"""The package version, in the one place every layer may read it from."""
__version__ = "0.1.0"
