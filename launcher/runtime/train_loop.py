"""The worker function, kept under its historical name: `train_loop.train` is what the Ray
Train workers, the parity harness and the spawn tests call. The trainer itself lives in
`launcher.runtime.trainer`."""

from launcher.runtime.trainer.batches import label_count, total_steps
from launcher.runtime.trainer.trainer import SAMPLES_FILE, SUMMARY_FILE, Trainer, train

__all__ = ["SAMPLES_FILE", "SUMMARY_FILE", "Trainer", "label_count", "total_steps", "train"]
