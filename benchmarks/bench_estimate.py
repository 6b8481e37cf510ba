"""Time `launcher estimate` for the largest catalog model (Llama-3.1-405B, 16 x 8 H100): the
estimate must stay under 2 seconds and read no weights.

    python benchmarks/bench_estimate.py
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    start = time.perf_counter()
    from launcher.estimate import estimate_recipe, format_estimate, model_recipe

    imported = time.perf_counter()
    est = estimate_recipe(model_recipe("meta-llama/Llama-3.1-405B"), nodes=16, live_prices=False)
    format_estimate(est)
    done = time.perf_counter()
    print(f"in-process: import {imported - start:.2f} s, estimate + report {done - imported:.3f} s")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "launcher", "estimate", "--model", "meta-llama/Llama-3.1-405B",
                    "--nodes", "16", "--offline-prices"], check=True, cwd=ROOT, capture_output=True)
    print(f"command line (launcher estimate --model meta-llama/Llama-3.1-405B --nodes 16): "
          f"{time.perf_counter() - start:.2f} s wall")


if __name__ == "__main__":
    main()
