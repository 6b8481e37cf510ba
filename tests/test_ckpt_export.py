"""Export of real DeepSpeed checkpoints (two gloo ranks on CPU) to Hugging Face safetensors, and
full optimizer states read back from the shards.

The checkpoints come from `_engine_worker` below, run as two processes: a tiny Llama trained 3
steps with the project's DeepSpeed config, saved with `engine.save_checkpoint`, plus what the live
engine reports (logits on a fixed input, full fp32 weights and Adam moments) to compare with.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe_dict
from launcher.checkpoint.safetensors_stream import (
    INDEX_FILE,
    ShardWriter,
    TensorSpec,
    parse_size,
    plan_shards,
)
from launcher.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TAG = "step-00000003"
LOGITS_ATOL = 1e-5  # fp32 export vs the fp32 engine: the same weights, the same math


def _recipe_dict(stage: int, tied: bool) -> dict:
    d = tiny_recipe_dict(name="export", parallelism={"zero_stage": stage}, resources={"cpu_workers": 2})
    d["model"]["config"]["tie_word_embeddings"] = tied
    return d


def _fixed_input() -> torch.Tensor:
    return torch.arange(2 * 12).reshape(2, 12) * 7 % 250


# --------------------------------------------------------------------------------------------
# the engine (runs in two subprocesses)


def _engine_worker(run_dir: Path, stage: int, tied: bool) -> None:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from transformers.integrations import HfDeepSpeedConfig

    from launcher.data import build_tokenizer
    from launcher.recipe import from_dict, to_yaml
    from launcher.runtime.ds_config import build_ds_config
    from launcher.runtime.model import build_model, param_groups

    recipe = from_dict(_recipe_dict(stage, tied))
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    tok = build_tokenizer(recipe.tokenizer, recipe.model.name_or_path)
    cfg = build_ds_config(recipe, data_parallel=2, on_gpu=False)
    hf = HfDeepSpeedConfig(cfg) if stage == 3 else None  # noqa: F841  (ZeRO-3 init)
    model = build_model(recipe.model, tok, seed=0)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, 0.1), config=cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1)),
    )
    g = torch.Generator().manual_seed(100 + rank)
    engine.train()
    for _ in range(3):
        ids = torch.randint(0, 262, (4, 16), generator=g)
        out = engine(input_ids=ids, labels=ids)
        engine.backward(out.loss)
        engine.step()
    engine.save_checkpoint(str(run_dir / "checkpoints"), tag=TAG)
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=_fixed_input()).logits.float()
    ref = {"logits": logits}
    if stage in (1, 2):
        # DeepSpeed 0.19.8 links each parameter to its Adam state after the first group's first
        # step, when later groups have no state yet: link again so safe_get_* sees every group
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    for name, p in engine.module.named_parameters():  # collective under ZeRO-3: every rank
        ref[f"fp32/{name}"] = safe_get_full_fp32_param(p).clone()
        for key in ("exp_avg", "exp_avg_sq"):
            ref[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key).clone()
    dist.barrier()
    if rank == 0:
        torch.save(ref, run_dir / "engine_ref.pt")
        (run_dir / "recipe.yaml").write_text(to_yaml(recipe))
        from launcher.checkpoint.manifest import checkpoint_files, file_digest, write_manifest

        step_dir = run_dir / "checkpoints" / TAG
        files = {rel: file_digest(step_dir / rel) for rel in checkpoint_files(step_dir)}
        write_manifest(step_dir, files, {})  # committed: a manifest listing what is there
        (run_dir / "checkpoints" / "latest").write_text(TAG)
    dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_and_save(run_dir: Path, stage: int, tied: bool) -> Path:
    run_dir.mkdir(parents=True)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
        log = open(run_dir / f"worker-{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, __file__, str(run_dir), str(stage), str(int(tied))],
                                       env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for p, log in procs:
        p.wait(timeout=300)
        log.close()
    for rank, (p, _) in enumerate(procs):
        assert p.returncode == 0, (run_dir / f"worker-{rank}.log").read_text()[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def z3_untied(tmp_path_factory):
    return _train_and_save(tmp_path_factory.mktemp("z3") / "run", 3, False)


@pytest.fixture(scope="module")
def z2_tied(tmp_path_factory):
    return _train_and_save(tmp_path_factory.mktemp("z2") / "run", 2, True)


def _ref(run_dir: Path) -> dict:
    return torch.load(run_dir / "engine_ref.pt", weights_only=True)


def _export(run_dir: Path, out: Path, **kw) -> dict:
    from launcher.checkpoint.export import export_checkpoint
    from launcher.recipe import load_recipe

    return export_checkpoint(run_dir / "checkpoints" / TAG, out, recipe=load_recipe(run_dir / "recipe.yaml"), **kw)


def _check_index(out: Path) -> dict[str, torch.Tensor]:
    """The index lists every tensor of every file, the files exist, total_size adds up."""
    from safetensors import safe_open

    index = json.loads((out / INDEX_FILE).read_text())
    weight_map = index["weight_map"]
    found, nbytes = {}, 0
    for fname in sorted(set(weight_map.values())):
        assert (out / fname).is_file(), fname
        with safe_open(out / fname, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for k in f.keys():
                t = f.get_tensor(k)
                assert weight_map[k] == fname and k not in found
                found[k] = t
                nbytes += t.numel() * t.element_size()
    assert set(found) == set(weight_map)
    assert index["metadata"]["total_size"] == nbytes
    assert not list(out.glob("*.tmp"))
    return found


# --------------------------------------------------------------------------------------------
# export


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["z3_untied", "z2_tied"])
def test_exported_model_gives_the_engines_logits(variant, request, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = request.getfixturevalue(variant)
    out = tmp_path / "hf"
    summary = _export(run_dir, out, dtype="fp32", max_shard_size="100KB")
    assert len(summary["files"]) > 2  # several shards + index
    tensors = _check_index(out)
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref = _ref(run_dir)
    with torch.no_grad():
        logits = model(input_ids=_fixed_input()).logits
    torch.testing.assert_close(logits, ref["logits"], atol=LOGITS_ATOL, rtol=0)
    tied = variant == "z2_tied"
    assert ("lm_head.weight" in tensors) is not tied
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is tied
    assert summary["params"] == sum(p.numel() for p in model.parameters())
    assert (out / "tokenizer.json").is_file()


@pytest.mark.slow
def test_bf16_export_is_the_rounded_fp32_weights(z3_untied, tmp_path):
    from transformers import AutoConfig

    _export(z3_untied, tmp_path / "bf16", dtype="bf16")
    tensors = _check_index(tmp_path / "bf16")
    ref = _ref(z3_untied)
    for name, t in tensors.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, ref[f"fp32/{name}"].to(torch.bfloat16)), name
    assert AutoConfig.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    assert len(json.loads((tmp_path / "bf16" / INDEX_FILE).read_text())["weight_map"]) == len(tensors)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["z3_untied", "z2_tied"])
def test_full_optimizer_states_equal_the_engines(variant, request):
    from launcher.checkpoint.zero_reader import iter_full_optimizer_states, iter_full_params, read_meta

    run_dir = request.getfixturevalue(variant)
    step_dir = run_dir / "checkpoints" / TAG
    ref = _ref(run_dir)
    meta = read_meta(step_dir)
    assert meta.zero_stage == (3 if variant == "z3_untied" else 2) and meta.dp_world_size == 2
    assert meta.optimizer_step == 3 and meta.global_steps == 3 and meta.ds_version == "0.19.8"
    assert meta.shared_params == ({"lm_head.weight": "model.embed_tokens.weight"} if variant == "z2_tied" else {})
    names = [k.split("/", 1)[1] for k in ref if k.startswith("fp32/")]
    assert list(meta.param_shapes) == names  # model order
    assert meta.param_groups["model.norm.weight"] == 1 and meta.param_groups["model.embed_tokens.weight"] == 0
    seen = 0
    # a tiny remap budget: the files are unmapped and reopened many times on the way
    for name, states in iter_full_optimizer_states(step_dir, remap_bytes=4096):
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(states[key], ref[f"{key}/{name}"]), (name, key)
        seen += 1
    assert seen == len(names)
    some = [names[-1], names[0]]
    assert [n for n, _ in iter_full_params(step_dir, some)] == some


def _assert_user_error(res, text: str) -> None:
    """`launcher.cli.main` prints a UserError in one line and exits 2; the runner hands it back."""
    assert isinstance(res.exception, UserError), res.output
    assert text in str(res.exception)


@pytest.mark.slow
def test_cli_export_resolves_the_latest_committed_step(z3_untied, tmp_path):
    from typer.testing import CliRunner

    from launcher.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(app, ["ckpt", "export", str(z3_untied), "--out", str(out), "--json",
                              "--max-shard-size", "200KB"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert summary["step_dir"].endswith(TAG) and summary["dtype"] == "bf16"
    _check_index(out)
    # an uncommitted step directory (no manifest.json) is refused
    uncommitted = z3_untied / "checkpoints" / "step-00000009"
    uncommitted.mkdir()
    try:
        res = runner.invoke(app, ["ckpt", "export", str(z3_untied), "--out", str(tmp_path / "x"), "--step", "9"])
        _assert_user_error(res, "not committed")
    finally:
        uncommitted.rmdir()
    res = runner.invoke(app, ["ckpt", "export", str(z3_untied), "--out", str(tmp_path / "y"), "--step", "7"])
    _assert_user_error(res, "no checkpoint for step 7")
    res = runner.invoke(app, ["ckpt", "export", str(z3_untied), "--out", str(out)])
    _assert_user_error(res, "not empty")


def test_cli_export_errors_without_a_checkpoint(tmp_path):
    from typer.testing import CliRunner

    from launcher.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["ckpt", "export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    _assert_user_error(res, "does not exist")
    (tmp_path / "run" / "checkpoints" / "step-00000002").mkdir(parents=True)
    res = runner.invoke(app, ["ckpt", "export", str(tmp_path / "run"), "--out", str(tmp_path / "o")])
    _assert_user_error(res, "no committed checkpoint")
    res = runner.invoke(app, ["ckpt", "export", "--help"])
    assert res.exit_code == 0 and "Example: launcher ckpt export" in res.output


def test_reader_rejects_a_directory_without_deepspeed_files(tmp_path):
    from launcher.checkpoint.zero_reader import read_meta

    with pytest.raises(UserError, match="not a DeepSpeed checkpoint directory"):
        read_meta(tmp_path)


# --------------------------------------------------------------------------------------------
# the streaming safetensors writer


def test_streamed_shards_read_back_with_safetensors(tmp_path):
    from safetensors import safe_open

    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.tensor([True, False, True]),
        "e": torch.tensor(2.5, dtype=torch.float16),
        "f": torch.zeros(0, 4),
        "g": torch.randn(4, 4).t(),  # not contiguous
    }
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    path = tmp_path / "x.safetensors"
    with ShardWriter(path, specs) as w:
        for k, v in tensors.items():
            w.write(k, v)
    with safe_open(path, framework="pt") as f:
        assert list(f.keys()) == sorted(tensors)
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k
    # header + data, nothing else
    assert path.stat().st_size == 8 + int.from_bytes(path.read_bytes()[:8], "little") + sum(s.nbytes for s in specs)


def test_writer_refuses_out_of_order_and_leaves_no_partial_file(tmp_path):
    specs = [TensorSpec("a", (2,), torch.float32), TensorSpec("b", (2,), torch.float32)]
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="expected a"):
        with ShardWriter(path, specs) as w:
            w.write("b", torch.zeros(2))
    assert not list(tmp_path.iterdir())


def test_shard_sizes_and_planning():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30 and parse_size(1234) == 1234 and parse_size("1.5kb") == 1500
    with pytest.raises(UserError, match="max-shard-size"):
        parse_size("lots")
    specs = [TensorSpec(str(i), (n,), torch.float32) for i, n in enumerate([10, 10, 30, 5, 5])]
    plan = plan_shards(specs, 80)  # 40, 40, 120 (alone, over the limit), 20+20 bytes
    assert [[s.name for s in shard] for shard in plan] == [["0", "1"], ["2"], ["3", "4"]]
    assert plan_shards([], "1GB") == []


if __name__ == "__main__":
    _engine_worker(Path(sys.argv[1]), int(sys.argv[2]), bool(int(sys.argv[3])))
