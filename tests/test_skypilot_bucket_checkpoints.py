"""The commit protocol on object storage (issue 6, item 4): a step directory counts only when its
manifest is there AND every file it lists is there with the listed size. A mounted bucket can
show a manifest next to missing or partial files (a directory "rename" is a copy; an upload cut
short by a preemption); a resume skips such a directory and falls back to the previous committed
checkpoint, for every backend.

The slow test trains for real, fabricates a newer broken step directory in the run directory (the
stand-in for the bucket), and checks that a second start of the driver resumes from the last
good checkpoint and trains to the end."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from launcher.checkpoint import layout, manifest
from launcher.checkpoint.checkpointer import clean_uncommitted, prune


def _commit(run_dir, step, files=None):
    d = layout.checkpoints_dir(run_dir) / layout.step_tag(step)
    d.mkdir(parents=True)
    files = files or {"shard.pt": b"x" * (100 + step), "sub/rank-00000.json": b"{}"}
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    digests = {name: manifest.file_digest(d / name) for name in files}
    manifest.write_manifest(d, digests, {"step": step})
    layout.atomic_write_text(layout.checkpoints_dir(run_dir) / layout.LATEST, layout.step_tag(step) + "\n")
    return d


def _states(run_dir):
    return {s.step: (s.committed, s.problem) for s in layout.list_step_dirs(run_dir)}


def test_a_listed_file_missing_makes_the_newest_uncommitted(tmp_path):
    _commit(tmp_path, 10)
    newest = _commit(tmp_path, 20)          # `latest` names step 20
    (newest / "sub" / "rank-00000.json").unlink()   # not uploaded before the preemption
    states = _states(tmp_path)
    assert states[10] == (True, None)
    assert states[20][0] is False and states[20][1] == "sub/rank-00000.json: missing"
    assert layout.latest_committed(tmp_path).step == 10


def test_a_short_file_makes_it_uncommitted(tmp_path):
    _commit(tmp_path, 10)
    newest = _commit(tmp_path, 20)
    (newest / "shard.pt").write_bytes(b"x" * 7)    # partial upload: 7 of 120 bytes
    committed, problem = _states(tmp_path)[20]
    assert not committed and problem == "shard.pt: 7 bytes, the manifest lists 120"
    assert layout.latest_committed(tmp_path).step == 10


def test_an_unreadable_manifest_is_not_a_commit(tmp_path):
    _commit(tmp_path, 10)
    newest = _commit(tmp_path, 20)
    (newest / "manifest.json").write_text('{"files": {"shard.pt": {"si')   # manifest cut short
    committed, problem = _states(tmp_path)[20]
    assert not committed and problem.startswith("manifest.json: unreadable")
    assert layout.latest_committed(tmp_path).step == 10


def test_nothing_complete_means_no_resume(tmp_path):
    d = _commit(tmp_path, 10)
    (d / "shard.pt").unlink()
    assert layout.latest_committed(tmp_path) is None


def test_a_complete_directory_still_counts(tmp_path):
    _commit(tmp_path, 10)
    _commit(tmp_path, 20)
    assert _states(tmp_path) == {10: (True, None), 20: (True, None)}
    assert layout.latest_committed(tmp_path).step == 20


def test_resume_removes_the_incomplete_directory_and_keeps_the_good_one(tmp_path):
    good = _commit(tmp_path, 10)
    bad = _commit(tmp_path, 20)
    (bad / "shard.pt").write_bytes(b"")
    removed = clean_uncommitted(tmp_path)
    assert removed == [bad] and not bad.exists() and good.is_dir()
    # training reaches step 20 again: a save there is not skipped as "already committed"
    assert not any(s.step == 20 for s in layout.list_step_dirs(tmp_path))


def test_prune_never_keeps_an_incomplete_directory_in_place_of_a_good_one(tmp_path):
    for s in (10, 20, 30):
        _commit(tmp_path, s)
    (layout.checkpoints_dir(tmp_path) / "step-00000030" / "shard.pt").write_bytes(b"x")
    prune(tmp_path, keep_last=2)
    names = sorted(p.name for p in layout.checkpoints_dir(tmp_path).iterdir() if p.is_dir())
    assert names == ["step-00000010", "step-00000020", "step-00000030"]


def test_ckpt_verify_and_list_name_the_incomplete_directory(tmp_path):
    from typer.testing import CliRunner

    from launcher.cli.app import app

    _commit(tmp_path, 10)
    bad = _commit(tmp_path, 20)
    (bad / "shard.pt").write_bytes(b"x")
    res = CliRunner().invoke(app, ["ckpt", "verify", str(tmp_path), "--json"])
    results = {r["path"]: r for r in json.loads(res.output)}
    assert res.exit_code == 1
    assert results[str(bad)]["ok"] is False and "shard.pt" in results[str(bad)]["problems"][0]
    res = CliRunner().invoke(app, ["ckpt", "list", str(tmp_path), "--json"])
    rows = {r["step"]: r for r in json.loads(res.output)}
    assert rows[20]["committed"] is False and rows[20]["incomplete"].startswith("shard.pt")
    assert rows[10]["resume_from"] is True


# --- a real run, a broken newer step directory in the "bucket", a second start of the driver ---

@pytest.mark.slow
def test_second_start_resumes_from_the_last_complete_checkpoint(tmp_path):
    from ckpt_harness import LAUNCHER, ROOT, run, step_records

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""\
defaults: [{ROOT}/recipes/examples/tiny-sft.yaml]
name: bucket-test
data: {{synthetic: {{task: reverse, num_examples: 200}}}}
train: {{max_steps: 6, micro_batch_size: 4, eval_every: 0}}
checkpoint: {{every_steps: 3, keep_last: 3}}
sample: {{from_eval: 0}}
logging: {{tensorboard: false}}
""")
    bucket = tmp_path / "bucket-run"   # a local directory standing in for the mounted bucket
    log = tmp_path / "log"
    assert run(["run", str(recipe), "--run-dir", str(bucket), "train.max_steps=3"], log) == 0, log.read_text()[-3000:]
    good = layout.latest_committed(bucket)
    assert good is not None and good.step == 3
    # A newer step directory whose upload was cut short: the manifest made it, a shard did not
    # (one file listed but missing, one short).
    broken = layout.checkpoints_dir(bucket) / layout.step_tag(5)
    shutil.copytree(good.path, broken)
    doc = json.loads((broken / "manifest.json").read_text())
    doc["step"] = 5
    (broken / "manifest.json").write_text(json.dumps(doc))
    shard = max((p for p in broken.rglob("*") if p.is_file() and p.name != "manifest.json"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (layout.checkpoints_dir(bucket) / layout.LATEST).write_text(layout.step_tag(5) + "\n")
    assert layout.latest_committed(bucket).step == 3

    # The second start (a recovery): the same command, against the same directory.
    r = subprocess.run(LAUNCHER + ["run", str(recipe), "--run-dir", str(bucket)], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = r.stdout + r.stderr
    assert "skipping step-00000005" in out and shard.name in out and "Traceback" not in out
    resumes = [json.loads(x) for x in (bucket / "metrics.jsonl").read_text().splitlines() if '"resume"' in x]
    assert [e["step"] for e in resumes] == [3]
    assert [rec["step"] for rec in step_records(bucket)] == [1, 2, 3, 4, 5, 6]
    # the broken directory was replaced by a real commit at step 6 (and 5 is gone or rewritten whole)
    final = {s.step: s.committed for s in layout.list_step_dirs(bucket)}
    assert final.get(6) is True and all(final.values())
    assert not manifest.verify(layout.latest_committed(bucket).path)
