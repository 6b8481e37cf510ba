"""Pretrained models as users name them: a hub id resolved by transformers from a Hugging Face cache
(offline), and a directory relative to where the command runs.

The cache is a real hub snapshot built here (`models--org--name/snapshots/<rev>`, `refs/main`,
files as symlinks into `blobs/` as huggingface_hub writes them) holding a small Llama and a real
`tokenizers` BPE tokenizer trained in memory: the snapshot stands in for the hub, and
transformers' own resolution is the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from launcher.errors import DataError, RecipeError

ROOT = Path(__file__).resolve().parents[1]
REPO = "tiny-org/tiny-chat-llama"
REV = "0123456789abcdef0123456789abcdef01234567"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
WORDS = "apple banana cherry river stone cloud garden window yellow purple quiet little".split()


# --------------------------------------------------------------------------------------------
# a pretrained model and a hub snapshot of it


def _corpus(n: int = 300) -> list[str]:
    return [" ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(4 + i % 5)) + "." for i in range(n)]


def train_tokenizer():
    """A real byte-level BPE tokenizer, trained in memory, with pad/bos/eos and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=512
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_pretrained_model(out: Path) -> None:
    """A small Llama with random weights (seed 0) and the BPE tokenizer, as save_pretrained writes them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def add_to_hub_cache(cache: Path, repo_id: str, files: Path, rev: str = REV) -> Path:
    """Put the files of directory `files` into `cache` as huggingface_hub stores a downloaded
    snapshot: content-addressed blobs, a snapshot of relative symlinks, refs/main -> rev."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / rev
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for f in sorted(files.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    return snapshot


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict[str, Path]:
    """A saved model directory and a hub cache holding the same files as REPO."""
    base = tmp_path_factory.mktemp("pretrained")
    model_dir = base / "saved"
    save_pretrained_model(model_dir)
    cache = base / "hf-home" / "hub"
    snapshot = add_to_hub_cache(cache, REPO, model_dir)
    return {"dir": model_dir, "cache": cache, "home": base / "hf-home", "snapshot": snapshot}


def hub_env(pretrained: dict[str, Path], **extra: str) -> dict[str, str]:
    """The environment of a `launcher` subprocess that sees only the temporary cache, offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(pretrained["home"]), HF_HUB_CACHE=str(pretrained["cache"]), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def launcher(args: list, *, env: dict[str, str], cwd: Path, timeout: int = 600):
    return subprocess.run([sys.executable, "-m", "launcher", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def write_recipe(path: Path, model: str, *, task: str, data: Path) -> Path:
    d = {
        "name": f"hub-{task}",
        "model": {"name_or_path": model, "dtype": "fp32"},
        "data": {"format": "chat" if task == "sft" else "text", "path": [str(data)], "max_seq_len": 64,
                 **({"packing": True} if task == "pretrain" else {})},
        "train": {"task": task, "max_steps": 4, "micro_batch_size": 4, "lr": 1e-3, "warmup_steps": 0},
        "parallelism": {"zero_stage": 3},
        "resources": {"cpu_workers": 2},
        "checkpoint": {"at_end": True},
        "logging": {"tensorboard": False},
        "sample": {"prompts": ["apple banana"], "max_new_tokens": 4},
    }
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def chat_rows(path: Path, n: int = 64) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"repeat {w}"}, {"role": "assistant", "content": w}]}
            for w in (_corpus(n))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text_docs(path: Path, n: int = 80) -> Path:
    path.write_text("\n\n".join(_corpus(n)) + "\n")
    return path


def pretrained_norm_snapshot(out: Path) -> None:
    """save_pretrained_model, with the final norm's weights at 0.5 (random init gives 1.0), so a
    trained export shows that the workers started from these weights, not from a fresh init."""
    from safetensors.torch import load_file, save_file

    save_pretrained_model(out)
    weights = load_file(out / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], 0.5)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})


def check_export(export: Path, start: Path) -> None:
    """The export reloads with transformers, its tokenizer is the snapshot's, and its weights are
    the snapshot's after a few small steps: moved, but close."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(export)
    want = AutoTokenizer.from_pretrained(start)
    assert tok.get_vocab() == want.get_vocab() and tok.chat_template == want.chat_template
    assert tok("apple banana").input_ids == want("apple banana").input_ids
    initial = load_file(start / "model.safetensors")
    trained = dict(model.named_parameters())
    norm = trained["model.norm.weight"].detach()
    assert not torch.equal(norm, initial["model.norm.weight"])  # training happened
    assert (norm - 0.5).abs().max() < 0.02  # ... starting from the snapshot (a fresh init is 1.0)
    name = "model.layers.0.mlp.up_proj.weight"
    w0, w1 = initial[name], trained[name].detach()
    assert 0 < (w1 - w0).norm() < 0.5 * w0.norm()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tok("apple banana").input_ids])).logits
    assert logits.shape[-1] == len(want) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_fine_tune_by_hub_id_offline_and_from_a_relative_directory(tmp_path):
    """SFT by hub id from the offline cache, and pretraining from `models/mine` relative to the
    command's directory: ZeRO-3, 2 CPU workers, the real CLI; then export and reload both."""
    saved = tmp_path / "saved"
    pretrained_norm_snapshot(saved)
    cache = tmp_path / "hf-home" / "hub"
    add_to_hub_cache(cache, REPO, saved)
    env = hub_env({"home": tmp_path / "hf-home", "cache": cache})
    work = tmp_path / "work"
    shutil.copytree(saved, work / "models" / "mine")

    # by hub id: only the temporary cache has it, and only the environment says where that is,
    # so a worker that trains has seen HF_HUB_CACHE and HF_HUB_OFFLINE
    sft = write_recipe(work / "sft.yaml", REPO, task="sft", data=chat_rows(work / "chat.jsonl"))
    res = launcher(["run", sft, "--run-dir", "runs/sft"], env=env, cwd=work)
    assert res.returncode == 0, res.stdout + res.stderr
    recorded = yaml.safe_load((work / "runs/sft/recipe.yaml").read_text())
    assert recorded["model"]["name_or_path"] == REPO  # a hub id travels as it is
    for rank in (0, 1):
        log = (work / f"runs/sft/logs/rank-{rank}.log").read_text()
        assert "Retrying" not in log and "couldn't connect" not in log

    # from a relative directory, pretraining with packing
    pre = write_recipe(work / "pre.yaml", "models/mine", task="pretrain", data=text_docs(work / "docs.txt"))
    res = launcher(["run", pre, "--run-dir", "runs/pre"], env=env, cwd=work)
    assert res.returncode == 0, res.stdout + res.stderr
    recorded = yaml.safe_load((work / "runs/pre/recipe.yaml").read_text())
    assert recorded["model"]["name_or_path"] == str(work / "models" / "mine")  # absolute for the workers

    for run in ("sft", "pre"):
        export = ["ckpt", "export", f"runs/{run}", "--out", f"hf/{run}", "--dtype", "fp32"]
        res = launcher(export, env=env, cwd=work)
        assert res.returncode == 0, res.stdout + res.stderr
        check_export(work / "hf" / run, saved)


# --------------------------------------------------------------------------------------------
# fast: the driver's checks


def test_missing_hub_model_offline_exits_2_before_ray_starts(tmp_path, pretrained):
    work = tmp_path / "work"
    work.mkdir()
    data = chat_rows(work / "chat.jsonl")
    recipe = write_recipe(work / "sft.yaml", "nobody/no-such-model", task="sft", data=data)
    # the builtin tokenizer: nothing but the model check stands between the recipe and Ray
    args = ["run", recipe, "tokenizer.builtin=bytes", "--run-dir", "runs/x"]
    res = launcher(args, env=hub_env(pretrained), cwd=work, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.name_or_path" in errors[0] and "nobody/no-such-model" in errors[0]
    assert "hf download nobody/no-such-model" in errors[0] and "HF_HUB_OFFLINE" in errors[0]
    assert "Traceback" not in out and "starting workers" not in out
    assert not (work / "runs" / "x" / "ray").exists() and not (work / "runs" / "x" / "logs").exists()


def _recipe(model: str, **tokenizer):
    from conftest import tiny_recipe_dict
    from launcher.recipe import from_dict

    d = tiny_recipe_dict()
    d["model"] = {"name_or_path": model, "dtype": "fp32"}
    d["tokenizer"] = tokenizer
    return from_dict(d)


def test_unreachable_hub_fails_fast_without_retries(monkeypatch, capfd):
    """Not offline, but the hub does not answer: one short probe, then the cache alone decides
    (and the workers Ray would start inherit HF_HUB_OFFLINE=1), instead of ~50 s of retries."""
    import launcher.pretrained as pretrained
    from launcher.runtime.job import preflight

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(pretrained, "_unreachable", False)
    with pytest.raises(RecipeError, match=r"^model\.name_or_path: nobody/no-such-model not found") as e:
        preflight(_recipe("nobody/no-such-model"))
    assert "127.0.0.1:9) is unreachable" in str(e.value)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    err = capfd.readouterr().err
    assert "unreachable from here: using the local cache" in err and "Retrying" not in err


def test_relative_model_directory_resolves_against_the_working_directory(tmp_path, monkeypatch, pretrained):
    from launcher.pretrained import is_local, resolve_local_paths
    from launcher.runtime.job import preflight

    monkeypatch.chdir(tmp_path)
    shutil.copytree(pretrained["dir"], tmp_path / "models" / "mine")
    assert all(is_local(name) for name in ("models/mine", "./x", "../x", "/x", "~/x"))
    assert not is_local("models/missing") and not is_local("meta-llama/Llama-3.1-8B")

    r = _recipe("models/mine", name_or_path="./models/mine/")
    resolve_local_paths(r)
    assert r.model.name_or_path == r.tokenizer.name_or_path == str(tmp_path / "models" / "mine")
    r = _recipe("models/mine")
    tokenizer, _ = preflight(r)  # what `launcher run` does before it records and ships the recipe
    assert r.model.name_or_path == str(tmp_path / "models" / "mine") and len(tokenizer) == 324
    hub = _recipe("meta-llama/Llama-3.1-8B")
    resolve_local_paths(hub)
    assert hub.model.name_or_path == "meta-llama/Llama-3.1-8B"  # a hub id, left to transformers
    missing = r"model\.name_or_path: local directory \./models/other not found"
    with pytest.raises(RecipeError, match=missing) as e:
        resolve_local_paths(_recipe("./models/other"))
    assert str(tmp_path) in str(e.value)


def test_trust_remote_code_reaches_the_tokenizer(tmp_path):
    from launcher.data import build_tokenizer
    from launcher.data.tokenizer import bytes_tokenizer
    from launcher.recipe import TokenizerConfig

    bytes_tokenizer().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.update(auto_map={"AutoTokenizer": [None, "custom_tok.CustomTokenizer"]},
               tokenizer_class="CustomTokenizer")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "custom_tok.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    tok = build_tokenizer(TokenizerConfig(), str(tmp_path), trust_remote_code=True)
    assert type(tok).__name__ == "CustomTokenizer"
    with pytest.raises(DataError, match=r"model\.name_or_path: .* set model\.trust_remote_code=true"):
        build_tokenizer(TokenizerConfig(), str(tmp_path))


def test_submit_check_warns_when_nothing_here_can_answer(tmp_path, monkeypatch):
    from launcher.pretrained import check_for_submit

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    note = check_for_submit(_recipe("nobody/no-such-model"))
    assert note and "nobody/no-such-model was not checked: HF_HUB_OFFLINE is set" in note
    note = check_for_submit(_recipe("/cluster/models/mine"))
    assert note and note.startswith("model.name_or_path: /cluster/models/mine is not a directory here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match=r"model\.name_or_path: cannot load the model in .*empty"):
        check_for_submit(_recipe(str(tmp_path / "empty")))  # here, and definitely not a model


def test_submit_check_answers_from_the_cache(tmp_path, pretrained):
    """A hub id the local cache holds is checked offline (config and tokenizer), with no warning."""
    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from test_hub_models import _recipe, REPO\n"
        "from launcher.pretrained import check_for_submit\n"
        "print('note:', check_for_submit(_recipe(REPO)))\n"
        "print('note:', check_for_submit(_recipe('tiny-org/not-cached')))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=hub_env(pretrained), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    notes = [line for line in res.stdout.splitlines() if line.startswith("note:")]
    assert notes[0] == "note: None"
    assert notes[1].startswith("note: tiny-org/not-cached was not checked: HF_HUB_OFFLINE is set")
