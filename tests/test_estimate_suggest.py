"""`launcher estimate` is honest about its suggestions and prices: a suggestion fits only when the
node's host RAM holds what it offloads, each shows its speed (marked when much slower), the cost
table lists what fits first and leaves out GPUs without the recipe's dtype, and SkyPilot's live
catalog is read only when asked for, never on stdout. Fast: no weights, no network."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest

from conftest import RECIPES, ROOT
from launcher.estimate import estimate_recipe, format_estimate, model_recipe
from launcher.recipe import load_recipe

GiB = 1024**3
OFFLOAD_OPT = "parallelism.offload_optimizer=cpu"


def _est(model, overrides=(), **kw):
    return estimate_recipe(model_recipe(model, list(overrides)), **kw)


def _by_change(est, change):
    return next(s for s in est.suggestions if s.change == change)


# --- host RAM ----------------------------------------------------------------------------------

def test_offload_suggestion_does_not_fit_when_host_ram_cannot_hold_it():
    # 70B on one 8x A100-80GB node: offloading the optimizer fits the GPUs but needs ~1,600 GiB of
    # host RAM, more than the 1,024 GiB default for 8x A100
    est = _est("meta-llama/Llama-3.1-70B", gpu="A100-80GB", nodes=1, gpus_per_node=8)
    off = _by_change(est, OFFLOAD_OPT)
    assert off.gpu_fits is True and off.cpu_bytes_per_node > 1500 * GiB
    assert off.host_fits is False and off.fits is False
    assert est.host_memory_bytes == 1024 * GiB and "default for 8x A100-80GB" in est.host_memory_source
    text = format_estimate(est)
    assert "[RAM short]" in text and "[fits     ]    28" not in text
    assert "1,024.00 GiB host RAM (default for 8x A100-80GB; set node_memory_gb in the cluster profile" \
        in text
    # what fits is more GPUs, listed first
    assert est.suggestions[0].fits and "resources.nodes=" in est.suggestions[0].change

    # with 2 TiB per node it fits
    big = _est("meta-llama/Llama-3.1-70B", gpu="A100-80GB", nodes=1, gpus_per_node=8, node_memory_gb=2048)
    assert _by_change(big, OFFLOAD_OPT).fits is True
    assert big.to_json()["host_memory_bytes_per_node"] == 2048 * GiB


def test_the_recipes_own_offload_is_checked_against_host_ram():
    est = _est("meta-llama/Llama-3.1-70B", [OFFLOAD_OPT], gpu="A100-80GB", nodes=1, gpus_per_node=8)
    j = est.to_json()
    assert (j["gpu_fits"], j["host_fits"], j["fits"]) == (True, False, False)
    text = format_estimate(est)
    assert "verdict  does NOT fit: host RAM short by" in text and ": does NOT fit" in text
    # suggestions are made for it too, and the cheapest row that fits has the RAM for it
    assert any(s.fits for s in est.suggestions)
    fitting = [c for c in est.costs if c.fits]
    assert fitting and fitting[0].cheapest
    assert all(c.gpu != "A100-80GB" or c.instance in ("gpu_8x_a100_80gb_sxm4", "Standard_ND96amsr_A100_v4")
               for c in fitting), "8x A100-80GB instances with less than 1,600 GiB of RAM cannot hold it"
    assert any(c.instance == "p4de.24xlarge" and c.fits is False for c in est.costs)  # 1,152 GiB


def test_node_memory_option_and_bad_value():
    from test_cli import run_cli

    res = run_cli("estimate", "--model", "meta-llama/Llama-3.1-70B", "--gpu", "A100-80GB",
                  "--node-memory", "2048", "--json")
    assert res.returncode == 0, res.stderr
    j = json.loads(res.stdout)
    assert next(s for s in j["suggestions"] if s["change"] == OFFLOAD_OPT)["fits"] is True
    assert j["host_memory_bytes_per_node"] == 2048 * GiB and j["host_memory_source"].startswith("given")
    bad = run_cli("estimate", "--model", "gpt2", "--node-memory", "0")
    assert bad.returncode == 2 and "--node-memory" in bad.stderr and "Traceback" not in bad.stderr


def test_instance_memory_for_a_skypilot_profile():
    from launcher.estimate.prices import instance_memory_gib

    # 8x A100-80GB: p4de.24xlarge 1,152 GiB, a2-ultragpu-8g 1,360, Azure 1,900, Lambda 1,800
    assert instance_memory_gib("A100-80GB", 8) == 1152
    assert instance_memory_gib("A100-80GB", 8, ["gcp"]) == 1360
    assert instance_memory_gib("H100-80GB", 3) is None


# --- speed of suggestions ----------------------------------------------------------------------

def test_full_offload_on_one_l4_shows_its_58_days():
    recipe = load_recipe(RECIPES / "sft" / "mistral-7b-full-sft.yaml")
    est = estimate_recipe(recipe, gpu="L4", nodes=1, gpus_per_node=1, node_memory_gb=512)
    full = next(s for s in est.suggestions if "offload_param=cpu" in s.change)
    assert full.fits and full.step_time_s > 2 * est.time.step_time_s
    assert 55 < full.total_hours / 24 < 62
    assert full.slowdown == pytest.approx(est.time.tokens_per_s * full.step_time_s / est.time.tokens_per_step)
    text = format_estimate(est)
    host = f"{full.cpu_bytes_per_node / GiB:,.2f}"
    line = next(x for x in text.splitlines() if "[fits     ]" in x and host in x)
    assert f"step {full.step_time_s:,.2f} s, {full.total_hours / 24:.1f} days" in line


def test_much_slower_suggestions_are_marked_and_listed_after_the_others():
    # ZeRO-2 without activation checkpointing on one L4: everything together with both offloads costs
    # the recompute (x4/3) and the offload efficiency (0.40 -> 0.35 x 0.7 x 0.5): 4.4x
    over = ["train.micro_batch_size=4", "model.gradient_checkpointing=false", "parallelism.zero_stage=2",
            "data.max_seq_len=2048"]
    est = _est("Qwen/Qwen2.5-1.5B", over, gpu="L4", gpus_per_node=1, node_memory_gb=512)
    full = next(s for s in est.suggestions if "offload_param=cpu" in s.change)
    assert full.fits and full.slow
    assert full.slowdown == pytest.approx(0.40 / (0.35 * 0.7 * 0.5) * 4 / 3, rel=0.05)
    assert "(4x slower)" in format_estimate(est)
    fitting = [s for s in est.suggestions if s.fits]
    assert [s.slow for s in fitting] == sorted(s.slow for s in fitting)  # not much slower first
    assert all(not s.slow for s in fitting[:1])
    # a given efficiency is the recipe layout's: the offload still costs its share in a suggestion
    given = _est("Qwen/Qwen2.5-1.5B", over, gpu="L4", gpus_per_node=1, node_memory_gb=512, mfu=0.4)
    same = next(s for s in given.suggestions if s.change == full.change)
    assert same.slowdown == pytest.approx(full.slowdown)


# --- cost table --------------------------------------------------------------------------------

def test_cost_table_leaves_out_gpus_without_the_recipes_dtype():
    bf16 = estimate_recipe(load_recipe(RECIPES / "sft" / "llama-3.1-8b-full-sft.yaml"))
    assert bf16.layout.dtype == "bf16"
    assert not [c for c in bf16.costs if c.gpu.startswith("V100")]
    assert any("leaves out V100-16GB, V100-32GB: no bf16" in n for n in bf16.notes)
    fp16 = estimate_recipe(load_recipe(RECIPES / "sft" / "llama-3.1-8b-full-sft.yaml", ["model.dtype=fp16"]))
    assert [c for c in fp16.costs if c.gpu.startswith("V100")]


def test_cost_table_lists_what_fits_first():
    est = estimate_recipe(load_recipe(RECIPES / "sft" / "llama-3.1-8b-full-sft.yaml"))
    flags = [c.fits for c in est.costs]
    assert True in flags and False in flags
    assert flags == sorted(flags, reverse=True)
    assert est.costs[0].cheapest
    # one GPU per node: few offers fit (8-GPU instances with large GPUs), and the text shows both kinds
    est = _est("mistralai/Mistral-7B-v0.1", gpu="L4", gpus_per_node=1)
    rows = [x for x in format_estimate(est).splitlines() if x.startswith("  AWS") or x.startswith("  GCP")
            or x.startswith("  Azure") or x.startswith("  Lambda")]
    first_bad = next(i for i, x in enumerate(rows) if "(does not fit)" in x)
    assert first_bad > 0 and "<- cheapest that fits" in rows[0]
    assert all("(does not fit)" in x for x in rows[first_bad:])


# --- header ------------------------------------------------------------------------------------

def test_header_names_the_recipe_or_the_model():
    from test_cli import run_cli

    res = run_cli("estimate", "--model", "gpt2", "--gpu", "L4", "--gpus-per-node", "1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "estimate for --model gpt2"
    est = estimate_recipe(load_recipe(RECIPES / "sft" / "llama-3.1-8b-full-sft.yaml"))
    assert format_estimate(est).splitlines()[0] == "estimate for recipe llama-3.1-8b-full-sft"


# --- live prices: only when asked, never on stdout, with a timeout ------------------------------

FAKE_SKY_INIT = """
import os, pathlib, sys, time
pathlib.Path(os.environ["FAKE_SKY_MARKER"]).write_text("imported")
print("Failed to fetch catalog for aws (fake SkyPilot, offline)")  # what SkyPilot prints on stdout
os.write(1, b"native noise on fd 1\\n")
time.sleep(float(os.environ.get("FAKE_SKY_SLEEP", "0")))
"""

FAKE_SKY_CATALOG = """
from types import SimpleNamespace

def list_accelerators(gpus_only, name_filter, case_sensitive, clouds, all_regions):
    print("fetching", name_filter)
    if name_filter != "H100":
        return {}
    return {"H100": [SimpleNamespace(cloud="AWS", region="us-east-1", instance_type="p5.fake", price=50.0,
                                     spot_price=20.0, accelerator_count=8, memory=2048.0)]}
"""


@pytest.fixture
def fake_sky(tmp_path, monkeypatch):
    """A `sky` package that prints on stdout (as SkyPilot offline does) and records its import."""
    pkg = tmp_path / "fake" / "sky"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(FAKE_SKY_INIT))
    (pkg / "catalog.py").write_text(textwrap.dedent(FAKE_SKY_CATALOG))
    marker = tmp_path / "imported"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "fake"), str(ROOT)]))
    monkeypatch.setenv("FAKE_SKY_MARKER", str(marker))
    monkeypatch.delenv("LAUNCHER_OFFLINE_PRICES", raising=False)
    return marker


def _cli(*args):
    import subprocess

    return subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, stdin=subprocess.DEVNULL)


def test_json_estimate_does_not_touch_skypilot_unless_asked(fake_sky):
    recipe = str(RECIPES / "sft" / "llama-3.1-8b-full-sft.yaml")
    res = _cli("estimate", recipe, "--json")
    assert res.returncode == 0, res.stderr
    assert not fake_sky.exists(), "sky was imported without --live-prices"
    assert json.loads(res.stdout)["prices_source"].startswith("price table shipped")

    live = _cli("estimate", recipe, "--json", "--live-prices")
    assert live.returncode == 0, live.stderr
    assert fake_sky.exists()
    j = json.loads(live.stdout)  # SkyPilot's prints went elsewhere
    assert j["prices_source"] == "SkyPilot catalog (live)"
    assert [c["instance"] for c in j["costs"]] == ["p5.fake", "p5.fake"]
    assert "Failed to fetch" not in live.stdout and "noise" not in live.stdout


def test_live_prices_give_up_after_the_timeout(fake_sky, monkeypatch):
    from launcher.estimate import prices

    monkeypatch.setenv("FAKE_SKY_SLEEP", "30")
    monkeypatch.setattr(prices, "LIVE_PRICES_TIMEOUT_S", 2.0)
    est = estimate_recipe(load_recipe(RECIPES / "sft" / "llama-3.1-8b-full-sft.yaml"), live_prices=True)
    assert fake_sky.exists()
    assert est.prices_source.startswith("price table shipped") and est.costs
    assert ("live prices unavailable: SkyPilot's catalog did not answer within 2 s; "
            "using the shipped price table") in est.notes
