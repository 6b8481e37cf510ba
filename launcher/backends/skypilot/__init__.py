"""SkyPilot backend: cloud GPUs (spot with managed recovery, or on-demand), checkpoints in a bucket."""
