from __future__ import annotations

from pathlib import Path

import pytest

from conftest import RECIPES, ROOT, tiny_recipe_dict
from launcher.errors import RecipeError, UserError
from launcher.recipe import from_dict, load_recipe, resolve, to_dict

ALL_RECIPES = sorted(RECIPES.rglob("*.yaml"))


def test_tree_has_the_promised_recipes():
    names = {p.relative_to(RECIPES).as_posix() for p in ALL_RECIPES}
    assert {"examples/tiny-sft.yaml", "examples/tiny-pretrain.yaml"} <= names
    assert len(ALL_RECIPES) >= 7


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.relative_to(RECIPES).as_posix())
def test_every_recipe_loads(path: Path):
    recipe = load_recipe(path)
    assert recipe.name
    # the resolved form loads again to the same recipe (what recipe.yaml in a run dir holds)
    assert from_dict(to_dict(recipe)) == recipe


def test_defaults_inherit_and_override():
    r = load_recipe(RECIPES / "sft/llama-3.1-70b-full-sft.yaml")
    assert r.model.name_or_path == "meta-llama/Llama-3.1-70B"
    assert r.parallelism.offload_optimizer == "cpu"
    assert r.resources.nodes == 4
    assert r.model.gradient_checkpointing is True  # from the base recipe
    assert r.data.hub == "tatsu-lab/alpaca"


def test_dotlist_overrides_apply_last():
    r = load_recipe(RECIPES / "examples/tiny-sft.yaml", ["train.max_steps=7", "train.lr=1e-4", "data.packing=true"])
    assert (r.train.max_steps, r.train.lr, r.data.packing) == (7, 1e-4, True)


def test_defaults_relative_to_recipe_and_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\nname: a\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(UserError, match="cycle"):
        resolve(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("defaults: [missing.yaml]\n")
    with pytest.raises(UserError, match="missing.yaml"):
        resolve(tmp_path / "c.yaml")


def test_interpolation(tmp_path):
    p = tmp_path / "r.yaml"
    import yaml

    d = tiny_recipe_dict(name="interp")
    d["logging"] = {"tensorboard": False, "wandb_project": "${name}"}
    p.write_text(yaml.safe_dump(d))
    assert load_recipe(p).logging.wandb_project == "interp"


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        ("train.max_step=5", "train.max_step", "did you mean 'max_steps'"),
        ("trian.lr=1", "trian", "did you mean 'train'"),
        ("data.formt=text", "data.formt", "did you mean 'format'"),
        ("train.lr=fast", "train.lr", "expected a number"),
        ("train.micro_batch_size=0", "train.micro_batch_size", "at least 1"),
        ("model.dtype=bf32", "model.dtype", "'bf16'"),
        ("parallelism.zero_stage=5", "parallelism.zero_stage", "0, 1, 2 or 3"),
        ("data.packing=maybe", "data.packing", "true or false"),
        ("train.epochs=1", "train.max_steps", "exactly one"),
        ("parallelism.pipeline_stages=2", "parallelism.zero_stage", "ZeRO 0 or 1"),
        ("parallelism.offload_param=cpu", "parallelism.offload_param", "ZeRO-3"),
        ("train.task=pretrain", "data.format", "format=text"),
        ("model.config.model_type=lama", "model.config.model_type", "did you mean 'llama'"),
        ("name=bad name", "name", "letters, digits"),
    ],
)
def test_bad_recipes_name_the_key(override, key, fragment):
    overrides = [override]
    if override.startswith("parallelism.offload_param"):
        overrides = ["parallelism.zero_stage=2", override]
    with pytest.raises(RecipeError) as exc:
        load_recipe(RECIPES / "examples/tiny-sft.yaml", overrides)
    assert exc.value.key == key
    assert fragment in str(exc.value)


def test_flash_attention_with_packing_needs_one_row_per_micro_batch():
    """flash-attn keeps packed documents apart only for a batch of one row: more rows are refused,
    with both fixes named (and the grad_accum that keeps the global batch)."""
    fa = ["model.attn_implementation=flash_attention_2", "data.packing=true"]
    with pytest.raises(RecipeError) as exc:
        load_recipe(RECIPES / "examples/tiny-sft.yaml", [*fa, "train.micro_batch_size=4", "train.grad_accum=2"])
    assert exc.value.key == "train.micro_batch_size"
    assert "train.micro_batch_size=1 train.grad_accum=8" in str(exc.value)
    assert "model.attn_implementation=sdpa" in str(exc.value)
    # one row per micro-batch, no packing, or another kernel: accepted
    load_recipe(RECIPES / "examples/tiny-sft.yaml", [*fa, "train.micro_batch_size=1", "train.grad_accum=8"])
    load_recipe(RECIPES / "examples/tiny-sft.yaml", [fa[0], "data.packing=false", "train.micro_batch_size=4"])
    load_recipe(RECIPES / "examples/tiny-sft.yaml", ["model.attn_implementation=sdpa", fa[1], "train.micro_batch_size=4"])


def test_missing_required_sections():
    d = tiny_recipe_dict()
    del d["train"]
    with pytest.raises(RecipeError) as exc:
        from_dict(d)
    assert exc.value.key == "train.max_steps"
    d = tiny_recipe_dict(model={"dtype": "fp32"})
    with pytest.raises(RecipeError, match="name_or_path"):
        from_dict(d)


def test_pipeline_with_zero1_is_accepted():
    d = tiny_recipe_dict(parallelism={"zero_stage": 1, "pipeline_stages": 2}, resources={"cpu_workers": 2})
    assert from_dict(d).parallelism.pipeline_stages == 2


def test_invalid_yaml_is_a_user_error(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="broken.yaml"):
        load_recipe(p)
    p.write_text("- a list\n")
    with pytest.raises(UserError, match="mapping"):
        load_recipe(p)


def test_docs_reference_is_current():
    from launcher.recipe.docs import reference_markdown

    committed = (ROOT / "docs" / "recipe-reference.md").read_text()
    assert committed == reference_markdown(), "run `make docs` to regenerate docs/recipe-reference.md"


def test_every_field_has_a_docstring():
    import dataclasses

    from launcher.recipe.docs import field_docs
    from launcher.recipe.sections import SECTIONS

    for cls in SECTIONS:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
