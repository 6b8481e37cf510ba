"""SkyPilot cluster profiles: the shipped ones load; mistakes fail with the key and the fix."""

from __future__ import annotations

import pytest

from conftest import ROOT
from launcher.backends.profile import load_profile, profile_from_dict
from launcher.errors import RecipeError


def minimal(**extra):
    return {"backend": "skypilot", "accelerators": "H100:8", "checkpoint_bucket": "s3://ckpt-bucket/runs", **extra}


def test_shipped_profiles_load():
    spot = load_profile(ROOT / "cluster/example-skypilot.yaml")
    assert spot.backend == "skypilot" and spot.use_spot and spot.accelerators == "H100:8"
    assert spot.checkpoint_bucket.startswith("s3://") and spot.bucket_store == "s3"
    assert spot.infra() == ["aws/us-east-1", "aws/us-east-2", "aws/us-west-2"]
    gcp = load_profile(ROOT / "cluster/example-skypilot-gcp.yaml")
    assert not gcp.use_spot and gcp.bucket_store == "gcs" and gcp.gpus_per_node == 8 and gcp.accelerator == "A100-80GB"


def test_defaults():
    p = profile_from_dict(minimal())
    assert p.checkpoint_mount_mode == "MOUNT_CACHED" and p.use_spot is False and p.infra() == []
    assert p.secrets == ["HF_TOKEN", "WANDB_API_KEY"] and p.job_recovery == "EAGER_NEXT_REGION"


@pytest.mark.parametrize("uri, store", [
    ("s3://my-bucket", "s3"), ("gs://my-bucket/a/b", "gcs"), ("r2://my.bucket/x/", "r2"),
    ("https://myaccount.blob.core.windows.net/ckpts/prefix", "azure"),
])
def test_bucket_kinds(uri, store):
    assert profile_from_dict(minimal(checkpoint_bucket=uri)).bucket_store == store


def test_regions_follow_clouds():
    p = profile_from_dict(minimal(clouds=["aws", "gcp"], regions={"aws": ["us-east-1", "us-west-2"]}))
    assert p.infra() == ["aws/us-east-1", "aws/us-west-2", "gcp"]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("accelerators", "H100x8", "e.g. H100:8"),
        ("accelerators", "H100:8; rm -rf /", "e.g. H100:8"),
        ("accelerators", "H100:0", "e.g. H100:8"),
        ("checkpoint_bucket", "/local/dir", "s3://BUCKET/PREFIX"),
        ("checkpoint_bucket", "s3://b$(id)/x", "s3://BUCKET/PREFIX"),
        ("checkpoint_bucket", "s3://bucket/a b", "s3://BUCKET/PREFIX"),
        ("checkpoint_bucket", "ftp://bucket/x", "s3://BUCKET/PREFIX"),
        ("checkpoint_mount_mode", "COPY", "never uploads"),
        ("checkpoint_mount_mode", "mount", "must be one of 'MOUNT_CACHED', 'MOUNT', 'COPY'"),
        ("clouds", ["aws", "gpc"], "did you mean 'gcp'"),
        ("clouds", ["aws", "aws"], "listed twice"),
        ("regions", {"gcp": ["us-central1"]}, "add 'gcp' to `clouds`"),
        ("job_recovery", "EAGER", "must be one of"),
        ("max_restarts_on_errors", -1, "0 or more"),
        ("disk_size", 10, "50 to 65536"),
        ("image", "docker:img; rm -rf /", "without spaces or shell"),
        ("runs_root", "relative/dir", "under ~/"),
        ("runs_root", "~/a b", "under ~/"),
        ("runs_root", "~/../etc", "under ~/"),
        ("setup", ["echo 'unterminated"], r"cannot split"),
        ("env", {"HF_TOKEN": "x"}, "looks like a secret"),
        ("env", {"AWS_SECRET_ACCESS_KEY": "x"}, "looks like a secret"),
        ("env", {"LAUNCHER_RUN_ID": "x"}, "set by SkyPilot and the launcher"),
        ("secrets", ["HF TOKEN"], "an environment variable name"),
        ("usd_per_gpu_hour", -1, "0 or more"),
    ],
)
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(RecipeError, match=message) as e:
        profile_from_dict(minimal(**{key: value}))
    assert e.value.key.split(".")[0].split("[")[0] == key


def test_regions_with_a_bad_name():
    with pytest.raises(RecipeError, match=r"regions.aws\[0\]: a region name"):
        profile_from_dict(minimal(clouds=["aws"], regions={"aws": ["US East"]}))


def test_typo_and_missing_keys():
    with pytest.raises(RecipeError, match=r"acelerators: unknown key; did you mean 'accelerators'"):
        profile_from_dict({**minimal(), "acelerators": "H100:8"})
    with pytest.raises(RecipeError, match="checkpoint_bucket: required key is missing"):
        profile_from_dict({"backend": "skypilot", "accelerators": "H100:8"})
    with pytest.raises(RecipeError, match="backend: must be one of 'slurm', 'skypilot'"):
        profile_from_dict({**minimal(), "backend": "k8s"})
    # Slurm keys are not SkyPilot keys
    with pytest.raises(RecipeError, match="partition: unknown key"):
        profile_from_dict(minimal(partition="gpu"))


def test_cli_reports_a_bad_profile_with_exit_2_and_no_traceback(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "sky.yaml"
    bad.write_text("backend: skypilot\naccelerators: H100:8\ncheckpoint_bucket: s3://b-b/x\ncheckpoint_mount_mode: COPY\n")
    recipe = ROOT / "recipes/examples/tiny-sft.yaml"
    res = subprocess.run([sys.executable, "-m", "launcher", "submit", str(recipe), "--cluster", str(bad), "--dry-run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 2 and "sky.yaml: checkpoint_mount_mode" in out and "MOUNT_CACHED" in out, out
    assert "Traceback" not in out
