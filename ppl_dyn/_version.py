"""The package version (one place; ``ppl_dyn.__version__`` and the ArviZ attrs read it)."""

__version__ = "0.1.0"
