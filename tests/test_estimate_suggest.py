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

def test_search_keeps_only_layouts_whose_host_ram_holds_the_offload():
    # 70B on one 8x A100-80GB node: offloading the optimizer fits the GPUs but needs ~1,600 GiB of
    # host RAM, more than the 1,024 GiB default for 8x A100: the search never offers it there
    est = _est("meta-llama/Llama-3.1-70B", gpu="A100-80GB", nodes=1, gpus_per_node=8)
    assert est.host_memory_bytes == 1024 * GiB and "default for 8x A100-80GB" in est.host_memory_source
    assert est.suggestions and all(s.fits and s.host_fits and s.gpu_fits for s in est.suggestions)
    assert all(s.cpu_bytes_per_node <= 1024 * GiB for s in est.suggestions)
    assert OFFLOAD_OPT not in [s.change for s in est.suggestions]
    text = format_estimate(est)
    assert "1,024.00 GiB host RAM (default for 8x A100-80GB; set node_memory_gb in the cluster profile" in text
    # with 2 TiB per node, the same search may offload (and lists only what fits there)
    big = _est("meta-llama/Llama-3.1-70B", gpu="A100-80GB", nodes=1, gpus_per_node=8, node_memory_gb=2048)
    assert all(s.cpu_bytes_per_node <= 2048 * GiB for s in big.suggestions)
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
    assert j["suggestions"] and all(s["fits"] and s["cpu_bytes_per_node"] <= 2048 * GiB for s in j["suggestions"])
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

def _fake_check(limit_bytes):
    """A made-up memory and speed model: memory falls with ZeRO, offload, checkpointing, smaller
    micro-batches and more GPUs; offload and checkpointing cost speed."""
    from launcher.estimate.suggest import Check

    def check(lay):
        states = {0: 16, 1: 10, 2: 8, 3: 6}[lay.zero_stage] * 8 // lay.world
        states -= 4 if lay.offload_optimizer != "none" else 0
        act = {"none": 8, "selective": 4, "full": 1}[lay.ckpt] * lay.micro_batch
        mem = (max(states, 1) + act) * GiB
        eff = 1.0 * (0.7 if lay.offload_optimizer != "none" else 1) * (0.5 if lay.offload_param != "none" else 1)
        eff /= {"none": 1, "selective": 1.05, "full": 4 / 3}[lay.ckpt]
        tps = 1000.0 * lay.world * eff * (1 - 0.01 * lay.world)  # a little less per GPU at scale
        return Check(mem, mem <= limit_bytes, 10 * GiB, True, 1.0, tps, None)
    return check


def test_search_returns_only_fitting_layouts_cheapest_first_keeping_the_global_batch():
    from launcher.estimate.layout import Layout
    from launcher.estimate.suggest import candidates, suggest

    base = Layout(nodes=1, gpus_per_node=2, pipeline_stages=1, zero_stage=0, offload_optimizer="none",
                  offload_param="none", dtype="bf16", micro_batch=4, grad_accum=2, seq_len=2048, ckpt="none",
                  attn="sdpa")
    check = _fake_check(12 * GiB)
    assert not check(base).fits
    out = suggest(base, check, usd_per_gpu_hour=2.0, max_nodes=4)
    assert out and len(out) <= 8
    every = [lay for lay in candidates(base, max_nodes=4) if check(lay).fits]
    assert {s.layout for s in out} <= set(every)  # only layouts that fit
    assert all(check(s.layout).fits and s.per_gpu_total_bytes <= 12 * GiB for s in out)
    costs = [s.gpu_seconds_per_token for s in out]
    assert costs == sorted(costs)
    assert costs[0] == min(lay.world / check(lay).tokens_per_s for lay in every if lay != base)
    for s in out:  # the global batch (micro x accumulation x data-parallel = 16) is kept
        lay = s.layout
        assert lay.micro_batch * lay.grad_accum * lay.data_parallel == 16
        assert s.usd_per_million_tokens == pytest.approx(2.0 * s.gpu_seconds_per_token / 3600 * 1e6)
    # the search covers each dimension
    space = candidates(base, max_nodes=4)
    assert {lay.zero_stage for lay in space} == {0, 1, 2, 3}
    assert {lay.ckpt for lay in space} == {"none", "selective", "full"}
    assert {(lay.offload_optimizer, lay.offload_param) for lay in space} == {
        ("none", "none"), ("cpu", "none"), ("cpu", "cpu")}
    assert {lay.micro_batch for lay in space} == {1, 2, 4}
    assert {lay.world for lay in space} == {1, 2, 4, 8, 16, 32}
    assert not [lay for lay in space if lay.offload_param != "none" and lay.zero_stage != 3]


def test_nothing_fits_gives_no_suggestions_and_says_so():
    from launcher.estimate.layout import Layout
    from launcher.estimate.suggest import suggest

    base = Layout(nodes=1, gpus_per_node=1, pipeline_stages=1, zero_stage=0, offload_optimizer="none",
                  offload_param="none", dtype="bf16", micro_batch=1, grad_accum=1, seq_len=2048, ckpt="none",
                  attn="sdpa")
    assert suggest(base, _fake_check(GiB // 2), max_nodes=2) == []
    est = _est("meta-llama/Llama-3.1-405B", ["data.max_seq_len=131072"], gpu="L4", gpus_per_node=1)
    assert est.fits is False and est.suggestions == []
    assert "no layout in the search fits" in format_estimate(est)


def test_apply_writes_a_recipe_that_estimates_as_the_layout(tmp_path):
    from test_cli import run_cli

    src = RECIPES / "sft" / "llama-3.1-8b-full-sft.yaml"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(src.read_text())  # its defaults resolve under recipes/
    res = run_cli("estimate", str(recipe), "train.lr=2e-5", "--gpu", "L4", "--apply", "2", "--json")
    assert res.returncode == 0, res.stderr
    j = json.loads(res.stdout)
    written = tmp_path / "r.layout-2.yaml"
    assert j["applied"] == {"layout": 2, "overrides": j["suggestions"][1]["overrides"], "recipe": str(written)}
    text = written.read_text()
    assert text.startswith("# Written by `launcher estimate r.yaml --apply 2`")
    assert "defaults:\n- r.yaml\n" in text and "gpu: L4-24GB" in text
    again = estimate_recipe(load_recipe(written))
    assert again.fits is True and again.recipe_name == "llama-3.1-8b-full-sft"
    assert again.memory.per_gpu["total"] == j["suggestions"][1]["per_gpu_total_bytes"]
    assert load_recipe(written).train.lr == 2e-5  # the command line's overrides are kept
    out_of_range = run_cli("estimate", str(recipe), "--gpu", "L4", "--apply", "99")
    assert out_of_range.returncode == 2 and "choose one of the" in out_of_range.stderr


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
