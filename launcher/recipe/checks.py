"""Checks that span several recipe sections: combinations that cannot work."""

from __future__ import annotations

from launcher.errors import RecipeError
from launcher.recipe.sections import Recipe


def check_combinations(r: Recipe) -> None:
    """Raise RecipeError for a combination that would fail after launch."""
    _check_layout(r)
    _check_data(r)
    _check_model(r)
    _check_packed_attention(r)
    _check_lora(r)


def _check_layout(r: Recipe) -> None:
    par = r.parallelism
    if par.pipeline_stages > 1 and par.zero_stage >= 2:
        raise RecipeError(
            "parallelism.zero_stage",
            f"ZeRO-{par.zero_stage} cannot be combined with pipeline_stages={par.pipeline_stages}: "
            "DeepSpeed's pipeline engine supports ZeRO 0 or 1 only. Set parallelism.zero_stage=1 "
            "or parallelism.pipeline_stages=1",
        )
    if par.offload_param != "none" and par.zero_stage != 3:
        raise RecipeError(
            "parallelism.offload_param",
            f"parameter offload needs ZeRO-3 (zero_stage is {par.zero_stage}): set "
            "parallelism.zero_stage=3 or parallelism.offload_param=none",
        )
    if par.offload_optimizer != "none" and par.zero_stage == 0:
        raise RecipeError(
            "parallelism.offload_optimizer",
            "optimizer offload needs ZeRO 1, 2 or 3: set parallelism.zero_stage or "
            "parallelism.offload_optimizer=none",
        )
    if "nvme" in (par.offload_optimizer, par.offload_param) and not par.nvme_path:
        raise RecipeError(
            "parallelism.nvme_path", "nvme offload needs a local NVMe directory, e.g. /local_nvme"
        )
    workers = r.resources.num_workers
    if workers % par.pipeline_stages:
        raise RecipeError(
            "parallelism.pipeline_stages",
            f"{workers} workers cannot be split into {par.pipeline_stages} pipeline stages: "
            "use a divisor of the worker count",
        )
    if r.resources.nodes > 1 and not r.resources.gpus_per_node and r.resources.cpu_workers < r.resources.nodes:
        raise RecipeError(
            "resources.cpu_workers",
            f"{r.resources.nodes} nodes need at least one CPU worker each: set "
            f"resources.cpu_workers >= {r.resources.nodes}",
        )


def _check_data(r: Recipe) -> None:
    task, fmt = r.train.task, r.data.format
    _check_synthetic(r.data.synthetic, fmt, "data")
    for i, s in enumerate(r.data.sources):
        key = f"data.sources[{i}]"
        _check_synthetic(s.synthetic, s.format or fmt, key)
        made = s.format or fmt
        if (made == "text") != (fmt == "text"):
            raise RecipeError(
                f"{key}.format",
                f"a {made} source cannot join a mixture whose data.format is {fmt}: pretraining "
                "mixes text sources only, SFT mixes alpaca, sharegpt and chat sources",
            )
    if task in ("dpo", "orpo", "kto"):
        _check_preference(r)
    if task == "pretrain" and fmt != "text":
        raise RecipeError(
            "data.format",
            f"train.task=pretrain reads raw text: set data.format=text (got {fmt}), or train.task=sft",
        )
    if task in ("sft", "pretrain"):
        from launcher.data.synthetic import KTO_TASKS, PAIR_TASKS

        synthetic = r.data.synthetic
        if synthetic is not None and synthetic.task in PAIR_TASKS + KTO_TASKS:
            raise RecipeError(
                "data.synthetic.task",
                f"synthetic.task={synthetic.task} generates preference rows: set train.task="
                f"{'dpo' if synthetic.task in PAIR_TASKS else 'kto'}, or data.synthetic.task=reverse",
            )
    if task == "sft" and fmt == "text":
        raise RecipeError(
            "train.task",
            "data.format=text has no prompt/response pairs: set train.task=pretrain, or use an "
            "instruction format (alpaca, sharegpt, chat)",
        )


def _check_preference(r: Recipe) -> None:
    """DPO, ORPO and KTO read pairs (or labelled responses) one sequence at a time, from the
    data-parallel step: what the data or the layout cannot give is refused here."""
    from launcher.data.synthetic import KTO_TASKS, PAIR_TASKS

    task, data = r.train.task, r.data
    wanted = "chosen/rejected pairs" if task != "kto" else "responses with a desirable/undesirable label"
    if data.format == "text":
        raise RecipeError(
            "data.format",
            f"train.task={task} needs {wanted}, which data.format=text has not: use data.format=alpaca, "
            "sharegpt or chat with preference rows (docs/preference.md), or train.task=pretrain",
        )
    made = PAIR_TASKS if task != "kto" else KTO_TASKS
    synthetics = [("data", data.synthetic)] + [(f"data.sources[{i}]", s.synthetic) for i, s in enumerate(data.sources)]
    for key, synthetic in synthetics:
        if synthetic is not None and synthetic.task not in made:
            raise RecipeError(
                f"{key}.synthetic.task",
                f"train.task={task} needs {wanted}; synthetic.task={synthetic.task} generates SFT rows "
                f"without them: set {key}.synthetic.task={made[0]}, or train.task=sft",
            )
    if data.packing:
        raise RecipeError(
            "data.packing",
            f"train.task={task} scores each sequence on its own (a pair's log-probabilities): "
            "set data.packing=false",
        )
    if r.parallelism.pipeline_stages > 1:
        raise RecipeError(
            "parallelism.pipeline_stages",
            f"train.task={task} needs whole-sequence log-probabilities of the policy and the reference "
            "in one step, which the pipeline engine's stage-by-stage loss cannot give: set "
            "parallelism.pipeline_stages=1 (ZeRO-3 partitions the model instead)",
        )
    ref = r.preference.reference
    if task == "orpo":
        return
    if ref == "precomputed":
        raise RecipeError(
            "preference.reference",
            "precomputed reference log-probs are not implemented yet: set preference.reference=copy "
            "(a frozen copy, partitioned under ZeRO-3) or auto",
        )
    if ref == "base" and r.train.method == "full":
        raise RecipeError(
            "preference.reference",
            "reference=base disables LoRA adapters, and train.method=full has none: set "
            "preference.reference=copy (or auto), or train.method=lora",
        )


def _check_synthetic(synthetic, fmt: str, key: str) -> None:
    if synthetic is None:
        return
    from launcher.data.synthetic import TEXT_TASKS

    made = "text" if synthetic.task in TEXT_TASKS else "alpaca"
    if fmt != made:
        fix = f"{key}.format={made}" if key != "data" else f"data.format={made}"
        raise RecipeError(
            f"{key}.format" if key != "data" else "data.format",
            f"{key}.synthetic.task={synthetic.task} generates {made} rows: set {fix}"
            + (f", or {key}.synthetic.task=stories (text, for pretraining)" if fmt == "text" else ""),
        )


def _check_model(r: Recipe) -> None:
    if not r.tokenizer.name_or_path and not r.tokenizer.builtin and not r.model.name_or_path:
        raise RecipeError(
            "tokenizer",
            "a model built from model.config has no tokenizer of its own: set "
            "tokenizer.name_or_path or tokenizer.builtin=bytes",
        )
    model_type = (r.model.config or {}).get("model_type")
    if model_type and not r.model.name_or_path:
        from launcher.recipe.convert import did_you_mean
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if model_type not in CONFIG_MAPPING_NAMES:
            raise RecipeError(
                "model.config.model_type",
                f"unknown architecture '{model_type}'; "
                + did_you_mean(model_type, list(CONFIG_MAPPING_NAMES), "known ones include llama, mistral, qwen2, gpt2"),
            )
    vocab = (r.model.config or {}).get("vocab_size")
    if r.tokenizer.builtin == "bytes" and isinstance(vocab, int):
        from launcher.data.tokenizer import BYTES_VOCAB_SIZE

        if vocab < BYTES_VOCAB_SIZE:
            raise RecipeError(
                "model.config.vocab_size",
                f"the bytes tokenizer has {BYTES_VOCAB_SIZE} tokens: set vocab_size >= {BYTES_VOCAB_SIZE}",
            )


def _check_packed_attention(r: Recipe) -> None:
    # transformers turns position-id resets into per-document attention for flash-attn only when
    # the batch is one row; with more rows the packed documents of a row attend to each other.
    mbs, accum = r.train.micro_batch_size, r.train.grad_accum
    if r.model.attn_implementation == "flash_attention_2" and r.data.packing and mbs > 1:
        raise RecipeError(
            "train.micro_batch_size",
            f"model.attn_implementation=flash_attention_2 with data.packing=true keeps packed documents "
            f"apart only with one row per micro-batch (micro_batch_size is {mbs}): set "
            f"train.micro_batch_size=1 train.grad_accum={mbs * accum} (same global batch), or "
            "model.attn_implementation=sdpa",
        )


def _check_lora(r: Recipe) -> None:
    """LoRA and QLoRA (`train.method`): layouts and devices they cannot run on, and adapter
    targets that match nothing (checked here on the meta device for a model built from
    `model.config`; a pretrained model's names are checked by the driver's preflight)."""
    method = r.train.method
    if method == "full":
        return
    if r.parallelism.pipeline_stages > 1:
        raise RecipeError(
            "parallelism.pipeline_stages",
            f"train.method={method} cannot run with pipeline stages: the pipeline rebuilds the decoder "
            "layers into its own modules, which PEFT's adapters do not wrap. Set "
            "parallelism.pipeline_stages=1 (ZeRO-3 already partitions the frozen base), or train.method=full",
        )
    if method == "qlora":
        if not r.resources.gpus_per_node:
            raise RecipeError(
                "train.method",
                "qlora needs NVIDIA GPUs (bitsandbytes' 4-bit kernels) and this recipe runs on CPU workers "
                "(resources.gpus_per_node: 0): set train.method=lora, or resources.gpus_per_node",
            )
        if not r.model.name_or_path:
            raise RecipeError(
                "train.method",
                "qlora quantizes pretrained weights as they load, and model.config builds a random model: "
                "set model.name_or_path, or train.method=lora",
            )
    if not r.model.name_or_path and (r.model.config or {}).get("model_type"):
        from launcher.runtime.lora import check_targets, meta_model

        try:
            model = meta_model(r)
        except (ValueError, TypeError):
            return  # a config transformers cannot build: the worker's build says why
        check_targets(r, model)
