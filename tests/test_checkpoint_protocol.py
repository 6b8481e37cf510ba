"""The commit protocol's filesystem rules, without training: what counts as committed, which
checkpoint a resume picks, verification, pruning, fingerprints and notice windows."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_recipe_dict
from launcher.checkpoint import layout, manifest, preempt
from launcher.checkpoint.checkpointer import clean_uncommitted, prune
from launcher.checkpoint.state import capture_rng, fingerprint, fingerprint_diff, restore_rng
from launcher.recipe import from_dict


def _commit(run_dir, step, files=None):
    d = layout.checkpoints_dir(run_dir) / layout.step_tag(step)
    d.mkdir(parents=True)
    files = files or {"shard.pt": b"x" * (100 + step)}
    for name, data in files.items():
        (d / name).write_bytes(data)
    digests = {name: manifest.file_digest(d / name) for name in files}
    manifest.write_manifest(d, digests, {"step": step})
    return d


def test_only_directories_with_a_manifest_count(tmp_path):
    _commit(tmp_path, 10)
    root = layout.checkpoints_dir(tmp_path)
    (root / "step-00000020.tmp").mkdir()           # a save in progress
    (root / "step-00000030").mkdir()               # renamed by hand, no manifest
    (root / "step-00000030" / "shard.pt").write_bytes(b"y")
    steps = {(s.step, s.committed) for s in layout.list_step_dirs(tmp_path)}
    assert steps == {(10, True), (20, False), (30, False)}
    assert layout.latest_committed(tmp_path).step == 10


def test_latest_pointer_one_behind_still_resumes_newest(tmp_path):
    # a crash between the directory rename and the `latest` update
    _commit(tmp_path, 10)
    _commit(tmp_path, 20)
    layout.atomic_write_text(layout.checkpoints_dir(tmp_path) / layout.LATEST, "step-00000010\n")
    assert layout.latest_committed(tmp_path).step == 20


def test_latest_pointer_naming_a_missing_step_is_ignored(tmp_path):
    _commit(tmp_path, 10)
    (layout.checkpoints_dir(tmp_path) / layout.LATEST).write_text("step-00000099\n")
    assert layout.latest_committed(tmp_path).step == 10


def test_clean_uncommitted_removes_leftovers_only(tmp_path):
    good = _commit(tmp_path, 10)
    root = layout.checkpoints_dir(tmp_path)
    (root / "step-00000020.tmp").mkdir()
    (root / "step-00000005.deleting").mkdir()
    removed = {p.name for p in clean_uncommitted(tmp_path)}
    assert removed == {"step-00000020.tmp", "step-00000005.deleting"}
    assert good.is_dir() and (good / "manifest.json").exists()


def test_prune_keeps_the_newest_committed(tmp_path):
    for s in (10, 20, 30):
        _commit(tmp_path, s)
    (layout.checkpoints_dir(tmp_path) / "step-00000040.tmp").mkdir()
    prune(tmp_path, keep_last=2)
    names = sorted(p.name for p in layout.checkpoints_dir(tmp_path).iterdir())
    # the uncommitted save does not count as one of the kept checkpoints
    assert names == ["step-00000020", "step-00000030", "step-00000040.tmp"]


def test_verify_names_truncated_and_corrupted_files(tmp_path):
    d = _commit(tmp_path, 10, {"a.pt": b"a" * 1000, "b.pt": b"b" * 1000, "c.pt": b"c" * 10})
    assert manifest.verify(d) == []
    (d / "a.pt").write_bytes(b"a" * 500)                      # truncated
    (d / "b.pt").write_bytes(b"b" * 999 + b"X")               # same size, flipped byte
    (d / "c.pt").unlink()
    problems = {p.file.split("/")[-1]: p.what for p in manifest.verify(d)}
    assert "truncated" in problems["a.pt"] and "corrupted" in problems["b.pt"] and problems["c.pt"] == "missing"


def test_manifest_is_json_with_sizes_and_checksums_computed_while_writing(tmp_path):
    import xxhash

    from launcher.checkpoint.hashing import HashingWriter

    d = _commit(tmp_path, 3, {"x.bin": b"hello"})
    doc = json.loads((d / "manifest.json").read_text())
    assert doc["files"]["x.bin"] == {"size": 5, "xxh3_128": xxhash.xxh3_128(b"hello").hexdigest()}
    assert doc["step"] == 3 and doc["format"] == manifest.FORMAT_VERSION == 2
    w = HashingWriter(tmp_path / "y.bin")
    for part in (b"hel", memoryview(b"lo")):
        w.write(part)
    assert w.close() == doc["files"]["x.bin"] and (tmp_path / "y.bin").read_bytes() == b"hello"


def test_a_format_1_manifest_with_sha256_still_verifies(tmp_path):
    import hashlib

    d = layout.checkpoints_dir(tmp_path) / layout.step_tag(5)
    d.mkdir(parents=True)
    (d / "a.pt").write_bytes(b"old")
    (d / "manifest.json").write_text(json.dumps({"format": 1, "step": 5, "files": {
        "a.pt": {"size": 3, "sha256": hashlib.sha256(b"old").hexdigest()}}}))
    assert manifest.verify(d) == [] and layout.latest_committed(tmp_path).step == 5
    (d / "a.pt").write_bytes(b"new")
    assert "corrupted" in manifest.verify(d)[0].what


def test_fingerprint_allows_harmless_changes_and_names_breaking_ones():
    base = from_dict(tiny_recipe_dict())
    harmless = tiny_recipe_dict()
    harmless["train"]["max_steps"] = 999
    harmless["train"]["lr"] = 1e-5
    harmless["checkpoint"] = {"every_steps": 7}
    harmless["logging"] = {"tensorboard": False}
    assert fingerprint_diff(fingerprint(base), fingerprint(from_dict(harmless))) == []
    breaking = tiny_recipe_dict()
    breaking["data"]["max_seq_len"] = 32
    breaking["model"]["config"]["num_hidden_layers"] = 1
    diff = fingerprint_diff(fingerprint(base), fingerprint(from_dict(breaking)))
    assert any(d.startswith("data.max_seq_len:") for d in diff)
    assert any(d.startswith("model.config.num_hidden_layers:") for d in diff)
    assert len(diff) == 2


def test_rng_state_round_trips_through_json():
    import random

    import numpy as np
    import torch

    torch.manual_seed(1)
    state = json.loads(json.dumps(capture_rng()))
    want = (random.random(), float(np.random.rand()), torch.rand(3).tolist())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng(state)
    assert (random.random(), float(np.random.rand()), torch.rand(3).tolist()) == want


@pytest.mark.parametrize(
    "env,configured,want",
    [
        ({}, 45.0, 45.0),
        ({"LAUNCHER_PREEMPT_WINDOW_S": "90"}, None, 90.0),
        ({"SKYPILOT_CLOUD": "aws"}, None, 120.0),
        ({"SKYPILOT_CLOUD": "gcp"}, None, 30.0),
        ({"SLURM_JOB_ID": "12"}, None, 30.0),
        ({}, None, 120.0),
    ],
)
def test_notice_window_defaults(env, configured, want):
    assert preempt.notice_window_s(configured, env) == want


def test_stop_request_round_trip(tmp_path):
    import signal

    preempt.request_stop(tmp_path, signal.SIGUSR1, 30.0)
    stop = preempt.read_stop(tmp_path)
    assert stop["signal"] == "SIGUSR1" and stop["deadline"] - stop["time"] == pytest.approx(30.0)
    preempt.clear(tmp_path)
    assert preempt.read_stop(tmp_path) is None


MOUNTINFO = """\
22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
98 22 0:50 / /runs/x/checkpoints rw,nosuid,nodev,relatime - fuse.gcsfuse my-bucket rw,user_id=0
99 22 0:51 / /home/me/remote rw - fuse.sshfs me@host:/ rw
"""


@pytest.mark.parametrize("path,env,want", [
    ("/runs/x/checkpoints", {}, "manifest"),          # a bucket mount: no directory renames
    ("/runs/x/checkpoints/step-00000010", {}, "manifest"),
    ("/runs/x", {}, "rename"),
    ("/home/me/remote/ck", {}, "rename"),               # sshfs renames cheaply
    ("/runs/x/checkpoints", {"LAUNCHER_CKPT_COMMIT": "rename"}, "rename"),
    ("/tmp/y", {"LAUNCHER_CKPT_COMMIT": "manifest"}, "manifest"),
])
def test_commit_mode_by_mount_type(path, env, want, monkeypatch):
    from launcher.checkpoint import commit_mode

    monkeypatch.setattr(commit_mode.os.path, "realpath", lambda p: str(p))
    monkeypatch.setattr(commit_mode.Path, "exists", lambda self: True)
    assert commit_mode.commit_mode(path, env, MOUNTINFO) == want


def test_manifest_mode_prunes_by_deleting_without_renames(tmp_path, monkeypatch):
    import os

    for s in (10, 20, 30):
        _commit(tmp_path, s)
    renames = []
    monkeypatch.setattr(os, "replace", lambda *a: renames.append(a))
    monkeypatch.setattr(os, "rename", lambda *a: renames.append(a))
    prune(tmp_path, keep_last=2, mode="manifest")
    assert renames == []
    assert sorted(p.name for p in layout.checkpoints_dir(tmp_path).iterdir()) == ["step-00000020", "step-00000030"]


def test_host_copy_keeps_storage_sharing_and_is_detached_from_training():
    import torch

    from launcher.checkpoint.ds_engine import host_copy

    flat = torch.arange(10.0)
    state = {"a": flat[:4], "b": flat[4:].view(2, 3), "tied": [flat[:4]], "n": 3, "obj": {"x": flat}}
    copy = host_copy(state)
    flat.add_(100)  # training goes on
    assert copy["a"].tolist() == [0, 1, 2, 3] and copy["b"].tolist() == [[4, 5, 6], [7, 8, 9]]
    assert copy["a"].untyped_storage().data_ptr() == copy["b"].untyped_storage().data_ptr()
    assert copy["obj"]["x"].untyped_storage().data_ptr() == copy["a"].untyped_storage().data_ptr()
    assert copy["b"].storage_offset() == 4 and copy["n"] == 3
