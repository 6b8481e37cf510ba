"""`launcher ckpt export` against DeepSpeed's `zero_to_fp32` on the same ZeRO-3 checkpoint.

Builds (once, in --workdir) a run directory with a ZeRO-3 checkpoint of a ~370M-parameter Llama
(hidden 1024, 24 layers, vocab 32000, untied embeddings; random init, one optimizer step so the
Adam moments are in the shards) written by two gloo ranks on CPU, or with `--size 1.3b` of a
1.3B-parameter one (hidden 2048, intermediate 5504) written directly in the same layout. Then runs, each in its own
process: `convert_zero_checkpoint_to_fp32_state_dict` (safetensors output), our export with
--dtype fp32 (the same output), and our export with --dtype bf16. For each: wall time and peak
RSS of that process (`ru_maxrss` from wait4).  Goals: <= 0.5x zero_to_fp32's time and <= 1/3 of its peak RSS at both sizes.

    python benchmarks/bench_ckpt_export.py [--size 374m|1.3b] [--workdir /tmp/bench-ckpt-export] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAG = "step-00000001"

SIZES = {
    "374m": {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 16},
    "1.3b": {"hidden_size": 2048, "intermediate_size": 5504, "num_attention_heads": 16, "num_key_value_heads": 16},
}

RECIPE = {
    "name": "bench-export",
    "model": {
        "config": {
            "model_type": "llama",
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "vocab_size": 32000,
            "max_position_embeddings": 256,
            "tie_word_embeddings": False,
        },
        "dtype": "fp32",
    },
    "tokenizer": {"builtin": "bytes"},
    "data": {"format": "alpaca", "synthetic": {"task": "reverse", "num_examples": 16}, "max_seq_len": 64},
    "train": {"max_steps": 1, "micro_batch_size": 1, "lr": 1e-4},
    "parallelism": {"zero_stage": 3},
    "resources": {"cpu_workers": 2},
    "logging": {"tensorboard": False},
}


def _worker(run_dir: Path) -> None:
    """One rank: build the model under ZeRO-3, take one step, save the checkpoint."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from launcher.data import build_tokenizer
    from launcher.recipe import from_dict, to_yaml
    from launcher.runtime.ds_config import build_ds_config
    from launcher.runtime.model import build_model, param_groups

    recipe = from_dict(RECIPE)
    deepspeed.init_distributed(dist_backend="gloo")
    tok = build_tokenizer(recipe.tokenizer, None)
    cfg = build_ds_config(recipe, data_parallel=2, on_gpu=False)
    hf = HfDeepSpeedConfig(cfg)  # noqa: F841  (ZeRO-3 init: no rank holds the full model)
    model = build_model(recipe.model, tok, seed=0)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=cfg)
    ids = torch.randint(0, 262, (1, 8), generator=torch.Generator().manual_seed(dist.get_rank()))
    out = engine(input_ids=ids, labels=ids)
    engine.backward(out.loss)
    engine.step()
    engine.save_checkpoint(str(run_dir / "checkpoints"), tag=TAG)
    dist.barrier()
    if dist.get_rank() == 0:
        (run_dir / "recipe.yaml").write_text(to_yaml(recipe))
        _commit(run_dir / "checkpoints" / TAG)
        (run_dir / "checkpoints" / "latest").write_text(TAG)
        n = sum(p.ds_numel for p in engine.module.parameters())
        (run_dir / "params.txt").write_text(f"{n}\n")
    dist.barrier()


def _commit(step_dir: Path) -> None:
    """A manifest listing every file with its size (what `ckpt export` checks; no checksums)."""
    files = {p.name: {"size": p.stat().st_size} for p in step_dir.iterdir() if p.is_file() and p.name != "manifest.json"}
    (step_dir / "manifest.json").write_text(json.dumps({"format": 2, "files": files}) + "\n")


def fabricate_checkpoint(run_dir: Path, size: str) -> None:
    """A ZeRO-3 checkpoint of two ranks in DeepSpeed 0.19's exact layout (model states with
    `param_shapes`, optimizer files with `fp32_flat_groups` and Adam's moments), written without
    training: a model of 1.3B parameters cannot be trained on a small CPU machine, but its
    checkpoint can be written one rank at a time. The fp32 weights are random, the moments zero
    (never-written pages: they cost no memory while being saved)."""
    import collections

    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.recipe import from_dict, to_yaml
    from launcher.runtime.ds_config import build_ds_config

    recipe_d = json.loads(json.dumps(RECIPE))
    recipe_d["model"]["config"].update(SIZES[size])
    recipe = from_dict(recipe_d)
    cfg = {k: v for k, v in recipe_d["model"]["config"].items() if k != "model_type"}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **cfg))
    named = list(model.named_parameters())
    decay = [(n, p.shape) for n, p in named if p.dim() >= 2]
    no_decay = [(n, p.shape) for n, p in named if p.dim() < 2]
    groups = [collections.OrderedDict((n, torch.Size(s)) for n, s in g) for g in (decay, no_decay)]
    world, step_dir = 2, run_dir / "checkpoints" / TAG
    step_dir.mkdir(parents=True, exist_ok=True)
    ds_config = build_ds_config(recipe, data_parallel=world, on_gpu=False)
    gen = torch.Generator().manual_seed(0)
    for rank in range(world):
        flats, state = [], {}
        for gi, g in enumerate(groups):
            numel = sum(-(-s.numel() // world) for s in g.values())
            flat = torch.empty(numel)
            for start in range(0, numel, 1 << 24):  # random weights, a chunk at a time
                n = min(1 << 24, numel - start)
                flat[start:start + n] = torch.randn(n, generator=gen) * 0.02
            flats.append(flat)
            state[gi] = {"exp_avg": torch.empty(numel), "exp_avg_sq": torch.empty(numel), "step": torch.tensor(1.0)}
        pgroups = [{"weight_decay": 0.1 if gi == 0 else 0.0, "lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8,
                    "amsgrad": False, "params": [gi]} for gi in range(len(groups))]
        optim = {"optimizer_state_dict": {
            "zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0), "dynamic_loss_scale": False,
            "overflow": False, "partition_count": world,
            "optimizer_state_dict": {"state": state, "param_groups": pgroups}, "fp32_flat_groups": flats},
            "ds_config": ds_config, "ds_version": "0.19.8"}
        torch.save(optim, step_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        del optim, flats, state
        module = collections.OrderedDict((n, torch.empty(0)) for n, _ in named)
        states = {"module": module, "buffer_names": [], "optimizer": None, "param_shapes": groups,
                  "frozen_param_shapes": collections.OrderedDict(), "shared_params": {},
                  "frozen_param_fragments": collections.OrderedDict(), "lr_scheduler": None,
                  "global_steps": 1, "global_samples": 1, "dp_world_size": world, "mp_world_size": 1,
                  "ds_config": ds_config, "ds_version": "0.19.8"}
        torch.save(states, step_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    (run_dir / "recipe.yaml").write_text(to_yaml(recipe))
    _commit(step_dir)
    (run_dir / "checkpoints" / "latest").write_text(TAG)
    (run_dir / "params.txt").write_text(f"{sum(p.numel() for _, p in named)}\n")


def spawn_two_ranks(script: str, workdir: Path, log_prefix: str) -> list[int]:
    """Run `script --_worker WORKDIR` as two gloo ranks on this machine; exit if one fails.
    Returns each rank's peak resident memory in bytes (from wait4)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        log = open(workdir / f"{log_prefix}{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, script, "--_worker", str(workdir)], env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    rss = []
    for rank, p in enumerate(procs):
        _, status, usage = os.wait4(p.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"rank {rank} failed: see {workdir}/{log_prefix}{rank}.log")
        rss.append(usage.ru_maxrss * 1024)  # KiB on Linux
    return rss


def make_checkpoint(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    spawn_two_ranks(__file__, run_dir, "make-rank")


def measure(code: str) -> dict:
    """Run `code` in a fresh Python; its wall time and peak resident set (from wait4)."""
    start = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {code}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-ckpt-export"))
    ap.add_argument("--keep", action="store_true", help="Keep the checkpoint and outputs.")
    ap.add_argument("--repeat", type=int, default=2, help="Runs of each tool, alternating; best time, worst RSS.")
    ap.add_argument("--size", choices=sorted(SIZES), default="374m",
                    help="374m: trained one step by two gloo ranks; 1.3b: written directly in ZeRO-3's layout.")
    ap.add_argument("--_worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        _worker(args._worker)
        return

    run_dir = args.workdir / "run"
    step_dir = run_dir / "checkpoints" / TAG
    if not (step_dir / "manifest.json").is_file() or "files" not in (step_dir / "manifest.json").read_text():
        t = time.perf_counter()
        if args.size == "374m":
            make_checkpoint(run_dir)
        else:
            fabricate_checkpoint(run_dir, args.size)
        print(f"checkpoint written in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    params = int((run_dir / "params.txt").read_text())
    ckpt_bytes = sum(f.stat().st_size for f in step_dir.iterdir())
    outs = {k: args.workdir / k for k in ("zero_to_fp32", "export-fp32", "export-bf16")}
    for d in outs.values():
        shutil.rmtree(d, ignore_errors=True)

    commands = {
        "zero_to_fp32 (fp32)": lambda: (
            "from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict as c; "
            f"c({str(run_dir / 'checkpoints')!r}, {str(outs['zero_to_fp32'])!r}, safe_serialization=True, tag={TAG!r})"
        ),
    }
    for dtype in ("fp32", "bf16"):
        commands[f"launcher ckpt export --dtype {dtype}"] = lambda dtype=dtype: (
            "from launcher.cli import main; import sys; "
            f"sys.argv = ['launcher', 'ckpt', 'export', {str(run_dir)!r}, '--out', "
            f"{str(outs['export-' + dtype])!r}, '--dtype', {dtype!r}, '--json']; main()"
        )
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    for _ in range(max(1, args.repeat)):  # alternate, so that load from other work hits both alike
        for name, code in commands.items():
            target = outs["zero_to_fp32"] if name.startswith("zero") else outs["export-" + name.split()[-1]]
            shutil.rmtree(target, ignore_errors=True)
            runs[name].append(measure(code()))
    results = {name: {"wall_s": min(r["wall_s"] for r in rs), "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                      "runs": rs} for name, rs in runs.items()}

    # the two fp32 outputs hold the same tensors
    from safetensors import safe_open

    def tensors(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, framework="pt") as h:
                out.update({k: (f, k) for k in h.keys()})
        return out

    ours, theirs = tensors(outs["export-fp32"]), tensors(outs["zero_to_fp32"])
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    import torch

    for name in ("model.embed_tokens.weight", "model.layers.23.mlp.down_proj.weight", "lm_head.weight",
                 "model.norm.weight"):
        with safe_open(ours[name][0], framework="pt") as a, safe_open(theirs[name][0], framework="pt") as b:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name

    ref = results["zero_to_fp32 (fp32)"]
    print(f"model: {params / 1e6:.0f}M parameters; ZeRO-3 checkpoint of 2 ranks: {ckpt_bytes / 1e9:.2f} GB")
    print(f"{'':38} {'wall s':>8} {'peak RSS MB':>12} {'time vs z2f':>12} {'RSS vs z2f':>11}")
    for name, r in results.items():
        print(f"{name:38} {r['wall_s']:8.1f} {r['peak_rss_mb']:12.0f} "
              f"{r['wall_s'] / ref['wall_s']:11.2f}x {r['peak_rss_mb'] / ref['peak_rss_mb']:10.2f}x")
    print(json.dumps({"params": params, "checkpoint_bytes": ckpt_bytes, "results": results}))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
