"""The Slurm backend: `render.py` turns (recipe, profile, run directory) into an sbatch script,
`submit.py` submits, tracks and cancels through `launcher.backends.exec`."""
