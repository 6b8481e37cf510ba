"""Cluster profiles: the shipped ones load; mistakes fail with the key and the fix."""

from __future__ import annotations

import pytest

from conftest import ROOT
from launcher.backends.profile import load_profile, profile_from_dict
from launcher.errors import RecipeError, UserError

SHIPPED = sorted((ROOT / "cluster").rglob("*.yaml"))


def test_profiles_are_shipped():
    names = {p.relative_to(ROOT / "cluster").as_posix() for p in SHIPPED}
    assert {"example-slurm.yaml", "dev/local-slurm.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_profile_loads(path):
    import yaml

    p = load_profile(path)
    assert p.backend == yaml.safe_load(path.read_text())["backend"] in ("slurm", "skypilot")


def minimal(**extra):
    return {"backend": "slurm", "runs_root": "/shared/runs", **extra}


def test_typo_gets_did_you_mean():
    with pytest.raises(RecipeError, match=r"partiton: unknown key; did you mean 'partition'"):
        profile_from_dict(minimal(partiton="gpu"))


def test_missing_required_keys():
    with pytest.raises(RecipeError, match="runs_root: required key is missing"):
        profile_from_dict({"backend": "slurm"})
    with pytest.raises(RecipeError, match="backend: must be one of 'slurm'"):
        profile_from_dict({"backend": "pbs", "runs_root": "/x"})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("gpus_per_node", "eight", "expected an integer"),
        ("gpus_per_node", -1, "must be 0 or more"),
        ("time_limit", "one day", "HH:MM:SS"),
        ("mem_per_node", "lots", "480G"),
        ("preempt_signal_lead_s", 5, "10 to 65535"),
        ("partition", "gpu\n#SBATCH --wrap=rm", "no spaces, quotes"),
        ("account", "a;b", "no spaces, quotes"),
        ("qos", "$(id)", "no spaces, quotes"),
        ("constraint", "a b", "no spaces, quotes"),
        ("setup", ["echo 'unterminated"], r"setup\[0\]: cannot split"),
        ("env", {"HF_TOKEN": "x"}, "looks like a secret"),
        ("env", {"WANDB_API_KEY": "x"}, "looks like a secret"),
        ("env", {"AWS_SECRET_ACCESS_KEY": "x"}, "looks like a secret"),
        ("env", {"1BAD": "x"}, "not a valid variable name"),
        ("usd_per_gpu_hour", -2, "must be 0 or more"),
        ("node_memory_gb", 0, "host RAM of each node in GiB"),
        ("node_memory_gb", "lots", "expected a number"),
    ],
)
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(RecipeError, match=message) as e:
        profile_from_dict(minimal(**{key: value}))
    assert e.value.key.split(".")[0].split("[")[0] == key


def test_valid_values():
    p = profile_from_dict(minimal(time_limit="2-00:00:00", mem_per_node="0", constraint="h100&ib", env={"N": 4}))
    assert p.time_limit == "2-00:00:00" and p.env == {"N": "4"}
    for t in ("30", "30:00", "12:00:00", "1-12"):
        assert profile_from_dict(minimal(time_limit=t)).time_limit == t


def test_host_memory_for_the_estimator():
    # node_memory_gb wins; else mem_per_node in Slurm's binary units (M by default); 0 and empty: unknown
    assert profile_from_dict(minimal(node_memory_gb=1152, mem_per_node="480G")).host_memory_gib() == 1152
    assert profile_from_dict(minimal(mem_per_node="480G")).host_memory_gib() == 480
    assert profile_from_dict(minimal(mem_per_node="2T")).host_memory_gib() == 2048
    assert profile_from_dict(minimal(mem_per_node="512000")).host_memory_gib() == 500
    assert profile_from_dict(minimal(mem_per_node="0")).host_memory_gib() is None
    assert profile_from_dict(minimal()).host_memory_gib() is None


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="cluster profile not found"):
        load_profile(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("backend: slurm\nruns_root: /x\ngpus_per_nod: 8\n")
    with pytest.raises(UserError, match=r"bad.yaml: gpus_per_nod: unknown key; did you mean 'gpus_per_node'"):
        load_profile(bad)
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="mapping of keys"):
        load_profile(bad)
