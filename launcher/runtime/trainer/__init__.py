"""The trainer each worker runs (see `trainer.py`)."""

from launcher.runtime.trainer.trainer import SAMPLES_FILE, SUMMARY_FILE, Trainer, train

__all__ = ["SAMPLES_FILE", "SUMMARY_FILE", "Trainer", "train"]
