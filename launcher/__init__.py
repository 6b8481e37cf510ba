"""launcher: recipes in, trained and shareable checkpoints out (DeepSpeed on Ray)."""

__version__ = "0.1.0"
