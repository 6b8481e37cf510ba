"""`launcher estimate`: GPU memory, CPU memory, time and dollar cost of a recipe before launch.

    from launcher.estimate import estimate_recipe, format_estimate
    est = estimate_recipe(recipe, gpu="H100-80GB")
    est.fits, est.to_json(), print(format_estimate(est))

How the numbers are made: docs/estimate.md.
"""

from launcher.estimate.estimator import Estimate, estimate_recipe, model_recipe
from launcher.estimate.report import format_estimate

__all__ = ["Estimate", "estimate_recipe", "format_estimate", "model_recipe"]
