"""Loss parity across parallel layouts (issue 7): an independent PyTorch reference loop against
the launcher's training loop under every ZeRO stage, world size, gradient accumulation and
pipeline layout. `cells` says what runs, `reference` is the plain loop, `harness` spawns the
launcher's workers and compares, `worker` is the per-rank entry point."""
