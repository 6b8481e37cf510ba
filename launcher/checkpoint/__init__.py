"""Checkpoints: commit protocol, resume, preemption, reshard, verify and export (see docs/checkpoints.md)."""
