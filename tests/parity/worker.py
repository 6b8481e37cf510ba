"""One rank of a parity spawn: `python -m parity.worker SPEC.json` with torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) set by the harness.

It calls the launcher's worker function, `launcher.runtime.train_loop.train`, the one Ray Train
workers run, once per cell, all in one process group: a fresh run directory per cell, tokenizer
and data built once (as the Ray driver does). A cell that raises is written to
RUN_DIR/error-rank-R.txt and the next cell runs.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path


def main(spec_path: str) -> int:
    import torch.distributed as dist
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    from launcher.data import build_datasets, build_tokenizer
    from launcher.recipe import from_dict
    from launcher.runtime.precision import install_deepspeed_backports
    from launcher.runtime.train_loop import train

    spec = json.loads(Path(spec_path).read_text())
    # bf16 without ZeRO: DeepSpeed 0.19.8 refuses BF16_Optimizer there (launcher/runtime/precision.py);
    # the launcher's trainer installs the same backport before deepspeed.initialize
    install_deepspeed_backports()
    rank = int(os.environ["RANK"])
    # a rank left waiting in a collective by a failed peer gives up instead of hanging the spawn
    dist.init_process_group("gloo", timeout=timedelta(seconds=spec["collective_timeout_s"]))
    failed = 0
    tokenizer = data = None
    for cell in spec["cells"]:
        run_dir = Path(cell["run_dir"])
        try:
            recipe = from_dict(cell["recipe"])
            if data is None:
                tokenizer = build_tokenizer(recipe.tokenizer, recipe.model.name_or_path)
                data = build_datasets(recipe, tokenizer)
            train(recipe, run_dir, tokenizer=tokenizer, data=data, resume=False)
        except BaseException:  # noqa: BLE001 - recorded per cell; the next cell still runs
            failed += 1
            (run_dir / f"error-rank-{rank}.txt").write_text(traceback.format_exc())
            print(f"[rank {rank}] cell {cell['name']} failed:\n{traceback.format_exc()}", file=sys.stderr)
        # The cell's HfDeepSpeedConfig is a weak global in transformers: once train() returns it
        # must be gone, or the next (non-ZeRO-3) cell would build its model inside zero.Init.
        gc.collect()
        if is_deepspeed_zero3_enabled():
            print(f"[rank {rank}] ZeRO-3 still enabled after cell {cell['name']}: unset", file=sys.stderr)
            unset_hf_deepspeed_config()
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - the group is broken; later cells will say so
            pass
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
