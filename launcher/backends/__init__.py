"""Where a recipe runs: cluster profiles (`cluster/*.yaml`) and one package per backend.

`profile.py` holds the profile schema, `exec.py` the one seam every backend runs commands
through, `slurm/` the Slurm backend (a pure sbatch renderer, submission and tracking).
"""
