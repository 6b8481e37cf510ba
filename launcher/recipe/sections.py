"""The recipe schema: one keyword-only dataclass per recipe section.

The docstring under each field is the user-facing documentation: `launcher recipes docs`
and docs/recipe-reference.md are generated from it. Checks that involve one section live in
its `__post_init__`; checks that span sections live in `launcher.recipe.checks`.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field
from typing import Any, Literal

from launcher.errors import RecipeError

Dtype = Literal["bf16", "fp16", "fp32"]
Offload = Literal["none", "cpu", "nvme"]
Recompute = Literal["none", "selective", "full"]


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise RecipeError(key, message)


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """What network to train: pretrained weights, or an architecture built with random weights."""

    name_or_path: str | None = None
    """Hugging Face hub id (e.g. `meta-llama/Llama-3.1-8B`) or local directory with weights. Leave
    empty and set `config` to train from random initialisation."""

    config: dict[str, Any] | None = None
    """Inline architecture for random initialisation, as a transformers config dict including
    `model_type` (e.g. `{model_type: llama, hidden_size: 128, ...}`). With `name_or_path` set, these
    keys override the checkpoint's config instead."""

    dtype: Dtype = "bf16"
    """Training precision: `bf16`, `fp16` (with dynamic loss scaling) or `fp32`. CPU runs use fp32."""

    activation_checkpointing: Recompute = "none"
    """Activations recomputed in the backward pass instead of kept. `none`: keep everything.
    `selective`: keep the matmul outputs, recompute attention (softmax, dropout) and the elementwise
    operations (norms, activations), as in Korthikanti et al. 2022: most of the saving for a few
    percent more compute. `full`: keep only each decoder layer's input and recompute the layer: least
    memory, about a third more compute. Replaces `gradient_checkpointing` (`true` is `full`)."""

    gradient_checkpointing: InitVar[bool | None] = None
    # Not a recipe field: the old boolean spelling, read as `model.activation_checkpointing` (see
    # `upgrade_legacy` for recipe files). Kept in the constructor so that
    # `replace(model, gradient_checkpointing=False)` still means "none"; reading it is a property.

    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel. `sdpa` and `flash_attention_2` keep packed documents apart (see docs);
    `flash_attention_2` with packing only with `train.micro_batch_size: 1` (others are refused)."""

    trust_remote_code: bool = False
    """Allow model code shipped with a hub checkpoint to run. Only for sources you trust."""

    def __post_init__(self, gradient_checkpointing: bool | None) -> None:
        # the legacy boolean only changes the mode when it disagrees with it (`replace()` passes the
        # property's own value back, which keeps `selective`)
        on = self.activation_checkpointing != "none"
        if gradient_checkpointing is not None and gradient_checkpointing != on:
            self.activation_checkpointing = "full" if gradient_checkpointing else "none"
        _require(
            bool(self.name_or_path) or bool(self.config),
            "model",
            "set model.name_or_path (hub id or local directory) or model.config (inline architecture "
            "with model_type) for random initialisation",
        )
        if self.config is not None and not self.name_or_path:
            _require(
                "model_type" in self.config,
                "model.config.model_type",
                "an inline architecture needs model_type, e.g. model.config.model_type=llama",
            )


    @staticmethod
    def upgrade_legacy(data: dict[str, Any], prefix: str) -> dict[str, Any]:
        """`data` (the model section as written) with the boolean `gradient_checkpointing` read as
        `activation_checkpointing` (true: full, false: none); both set and different is an error."""
        if "gradient_checkpointing" not in data:
            return data
        data = dict(data)
        old, key = data.pop("gradient_checkpointing"), f"{prefix}.gradient_checkpointing"
        if old is None:
            return data
        _require(isinstance(old, bool), key, f"expected true or false, got {old!r} (deprecated: use "
                 f"{prefix}.activation_checkpointing: none | selective | full)")
        mode, new = ("full" if old else "none"), data.get("activation_checkpointing")
        _require(new is None or new == mode, key,
                 f"{str(old).lower()} conflicts with {prefix}.activation_checkpointing={new}: set only "
                 f"{prefix}.activation_checkpointing (none | selective | full; true was full)")
        data["activation_checkpointing"] = mode
        return data


def _legacy_gradient_checkpointing(self: ModelConfig) -> bool:
    """The old boolean, read-only: True when any activation checkpointing is on."""
    return self.activation_checkpointing != "none"


# replaces the InitVar's class-level default (None), which only the constructor's signature needs
ModelConfig.gradient_checkpointing = property(_legacy_gradient_checkpointing)  # type: ignore[assignment]


@dataclass(kw_only=True, slots=True)
class TokenizerConfig:
    """Which tokenizer turns text into token ids."""

    name_or_path: str | None = None
    """Hub id or local directory of a tokenizer. Empty: use `model.name_or_path`."""

    builtin: Literal["bytes"] | None = None
    """A tokenizer the project builds itself, for offline use: `bytes` is a byte-level tokenizer
    (256 byte tokens plus special tokens) with a simple chat template."""

    def __post_init__(self) -> None:
        _require(
            not (self.name_or_path and self.builtin),
            "tokenizer",
            "set either tokenizer.name_or_path or tokenizer.builtin, not both",
        )


@dataclass(kw_only=True, slots=True)
class SyntheticDataConfig:
    """Data the project generates itself (offline demos and tests)."""

    task: Literal["reverse", "add", "sort", "stories", "reverse_pairs", "reverse_kto"] = "reverse"
    """`reverse`: reverse a short word; `add`: add two small numbers; `sort`: sort letters (alpaca
    rows, `data.format=alpaca`). `stories`: short stories as text rows, for pretraining
    (`data.format=text`). `reverse_pairs`: preference pairs for DPO and ORPO (the right reversal
    `chosen`, a near miss `rejected`); `reverse_kto`: KTO rows (one answer and its `label`)."""

    num_examples: int = 4000
    """How many rows to generate."""

    seed: int = 1234
    """Seed of the generator; the same seed gives the same rows."""

    def __post_init__(self) -> None:
        _require(self.num_examples >= 1, "data.synthetic.num_examples", "must be at least 1")


SampleBy = Literal["line", "paragraph", "document"]


@dataclass(kw_only=True, slots=True)
class DataSourceConfig:
    """One entry of `data.sources`: a data set, its format and its share of the mixture."""

    path: list[str] = field(default_factory=list)
    """Local files (`.json`, `.jsonl`, `.txt`, `.parquet`, `.arrow`), like `data.path`."""

    hub: str | None = None
    """A Hugging Face hub dataset id, like `data.hub`."""

    hub_config: str | None = None
    """Configuration (subset) name of the hub dataset."""

    hub_revision: str | None = None
    """Branch, tag or commit of the hub dataset (a commit makes the prepared data reproducible)."""

    split: str = "train"
    """Split of the hub dataset."""

    streaming: bool = False
    """Stream the hub dataset instead of downloading it whole into the `datasets` cache."""

    synthetic: SyntheticDataConfig | None = None
    """Generated rows instead of files or the hub."""

    format: Literal["alpaca", "sharegpt", "chat", "text"] | None = None
    """Row format of this source (default: `data.format`)."""

    sample_by: SampleBy | None = None
    """Text sources: what one document is (default: `data.sample_by`)."""

    weight: float | None = None
    """Sampling proportion: this source's share of the mixture's examples (weights are
    normalised; a source is repeated or subsampled to reach its share). Set this or `epochs`."""

    epochs: float | None = None
    """Passes over this source per mixture epoch, instead of `weight` (e.g. 2: every example twice)."""

    columns: dict[str, str] = field(default_factory=dict)
    """Field mapping, format field -> this source's column, e.g. `{instruction: question,
    output: answer}` (alpaca) or `{conversations: dialog}` (sharegpt)."""

    roles: dict[str, str] = field(default_factory=dict)
    """Speaker mapping, this source's role name -> a known one (`human`, `gpt`, `system`,
    `function_call`, `observation`, `user`, `assistant`, `tool`), e.g. `{USER: human, BOT: gpt}`."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the training data comes from and how it becomes token sequences."""

    format: Literal["alpaca", "sharegpt", "chat", "text"] = "alpaca"
    """Row format. `alpaca`: instruction/input/output; `sharegpt`: `conversations` of
    `{from, value}` (also `function_call`/`observation` turns and a `tools` column); `chat`:
    `messages` of `{role, content}` (also `tool_calls` and `role: tool`) through the tokenizer's
    chat template; `text`: a `text` field (jsonl/parquet) or a `.txt` file, for pretraining."""

    path: list[str] = field(default_factory=list)
    """One or several local files (`.json`, `.jsonl`, `.txt`, `.parquet`, `.arrow`). Relative
    paths are resolved against the directory the command runs in."""

    hub: str | None = None
    """A Hugging Face hub dataset id, instead of `path` (needs network access)."""

    hub_split: str = "train"
    """Split of the hub dataset to read."""

    hub_config: str | None = None
    """Configuration (subset) name of the hub dataset."""

    hub_revision: str | None = None
    """Branch, tag or commit of the hub dataset (a commit makes the prepared data reproducible)."""

    streaming: bool = False
    """Stream the hub dataset while preparing, for corpora larger than the local disk cache."""

    synthetic: SyntheticDataConfig | None = None
    """Generate the data instead of reading it (see the `data.synthetic` section)."""

    sources: list[DataSourceConfig] = field(default_factory=list)
    """A mixture of several data sets, instead of `path`/`hub`/`synthetic`: each entry has its
    own files or hub id, format, field mapping and `weight` or `epochs` (see docs/data.md)."""

    sample_by: SampleBy = "paragraph"
    """Text: what one document of a `.txt` file is. `line`: every line (a corpus of one article
    per line); `paragraph`: blank-line separated blocks; `document`: the whole file."""

    cache_dir: str | None = None
    """Where prepared (tokenized, memory-mapped) data sets are kept, one per fingerprint. Default
    `$XDG_CACHE_HOME/launcher/data` (`~/.cache/launcher/data`); on Slurm and SkyPilot use a path
    every node sees."""

    num_proc: int = 0
    """Processes that tokenize while preparing (0: every core of this machine)."""

    max_seq_len: int = 2048
    """Sequence length in tokens. Longer examples are truncated (SFT) or split (pretraining)."""

    packing: bool = False
    """Concatenate several examples into each sequence of `max_seq_len` tokens. Position ids restart
    at every document, so `sdpa` and `eager` attention keep documents apart (`flash_attention_2`
    only with `train.micro_batch_size: 1`)."""

    mask_prompt: bool = True
    """SFT: compute the loss on response tokens only (prompt labels are -100)."""

    prompt_template: str = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
    """Alpaca prompt. `{instruction}` and `{input_block}` (the input followed by a blank line, or
    nothing when the input is empty) are filled in; the output follows it."""

    eval_fraction: float = 0.0
    """Fraction of rows held out for evaluation (0 disables unless `eval_path` is set). Text with
    too few documents to hold out whole ones is held out by sequences."""

    eval_path: list[str] = field(default_factory=list)
    """Separate evaluation files, in the same format (instead of `eval_fraction`)."""

    skip_malformed: bool = False
    """Skip rows that do not fit the format (and count them, per reason) instead of stopping
    with an error."""

    shuffle: bool = True
    """Shuffle the training examples each epoch (seeded by `train.seed`)."""

    def __post_init__(self) -> None:
        sources = sum([bool(self.path), bool(self.hub), self.synthetic is not None, bool(self.sources)])
        _require(
            sources == 1, "data", "set exactly one of data.path, data.hub, data.synthetic, data.sources"
        )
        _require(self.max_seq_len >= 8, "data.max_seq_len", "must be at least 8")
        _require(self.num_proc >= 0, "data.num_proc", "must be 0 (every core) or more")
        _require(
            0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1), e.g. 0.05"
        )
        _require(
            not (self.eval_fraction and self.eval_path),
            "data.eval_fraction",
            "set data.eval_fraction or data.eval_path, not both",
        )
        for i, s in enumerate(self.sources):
            key = f"data.sources[{i}]"
            where = sum([bool(s.path), bool(s.hub), s.synthetic is not None])
            _require(where == 1, key, "set exactly one of path, hub, synthetic")
            _require(
                (s.weight is None) != (s.epochs is None), f"{key}.weight", "set exactly one of weight and epochs"
            )
            _require(s.weight is None or s.weight > 0, f"{key}.weight", "must be positive, e.g. 0.3")
            _require(s.epochs is None or s.epochs > 0, f"{key}.epochs", "must be positive, e.g. 1")
            _require(not (s.hub is None and s.streaming), f"{key}.streaming", "only hub sources stream")
        _require(not (self.hub is None and self.streaming), "data.streaming", "only data.hub streams")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The optimisation: how long, how big the batches, which learning-rate schedule."""

    task: Literal["sft", "pretrain", "dpo", "orpo", "kto"] = "sft"
    """`sft`: supervised fine-tuning on prompt/response data (prompt tokens masked); `pretrain`:
    next-token prediction on every token of raw text; `dpo`, `orpo`: preference training on
    `chosen`/`rejected` responses after a shared prompt; `kto`: preference training on single
    responses labelled desirable or undesirable (see the `preference` section and docs/preference.md)."""

    method: Literal["full", "lora", "qlora"] = "full"
    """`full`: every weight is trained. `lora`: the base model is frozen and low-rank adapters are
    trained (see the `lora` section); only they carry gradients and optimizer state. `qlora`: LoRA
    on a base quantized to 4 bits by bitsandbytes (NVIDIA GPUs only)."""

    max_steps: int | None = None
    """Optimizer steps to run. Set this or `epochs`."""

    epochs: float | None = None
    """Passes over the training data (may be fractional). Set this or `max_steps`."""

    micro_batch_size: int = 1
    """Sequences per worker per forward pass."""

    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step. Global batch = micro_batch_size x grad_accum
    x data-parallel workers."""

    lr: float = 2e-5
    """Peak learning rate (AdamW)."""

    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr` for the cosine and linear schedules."""

    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""

    warmup_steps: int = 0
    """Steps of linear warmup from 0 to `lr`."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""

    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""

    seed: int = 42
    """Seed for initialisation, shuffling and dropout."""

    eval_every: int = 0
    """Evaluate every N optimizer steps and at the end (0: only at the end, if there is eval data)."""

    eval_batches: int = 8
    """Micro-batches per evaluation."""

    chunked_loss: int = 1024
    """Tokens per chunk of the language-model head and cross-entropy: the logits (upcast to fp32) of
    that many tokens exist at a time, not the whole micro-batch's, and are recomputed in the
    backward pass; the loss and gradients are the same. 0 computes all logits at once. Models with
    final logit softcapping (Gemma 2) always use the unchunked loss."""

    def __post_init__(self) -> None:
        _require(
            (self.max_steps is None) != (self.epochs is None),
            "train.max_steps",
            "set exactly one of train.max_steps and train.epochs",
        )
        if self.max_steps is not None:
            _require(self.max_steps >= 1, "train.max_steps", "must be at least 1")
        if self.epochs is not None:
            _require(self.epochs > 0, "train.epochs", "must be positive")
        _require(self.micro_batch_size >= 1, "train.micro_batch_size", "must be at least 1")
        _require(self.grad_accum >= 1, "train.grad_accum", "must be at least 1")
        _require(self.lr > 0, "train.lr", "must be positive, e.g. 2e-5")
        _require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
        _require(self.warmup_steps >= 0, "train.warmup_steps", "must be 0 or more")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be 0 or more")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "train.betas",
            "must be two numbers in [0, 1), e.g. [0.9, 0.95]",
        )
        _require(self.max_grad_norm >= 0, "train.max_grad_norm", "must be 0 or more")
        _require(self.eval_every >= 0, "train.eval_every", "must be 0 or more")
        _require(self.eval_batches >= 1, "train.eval_batches", "must be at least 1")
        _require(self.chunked_loss >= 0, "train.chunked_loss", "must be 0 (off) or tokens per chunk, e.g. 1024")


@dataclass(kw_only=True, slots=True)
class LoraConfig:
    """The adapters of `train.method: lora | qlora` (PEFT's LoRA)."""

    rank: int = 16
    """Rank r of each adapter's two matrices."""

    alpha: float = 32.0
    """Scaling numerator: the adapter's update is multiplied by alpha / rank."""

    dropout: float = 0.05
    """Dropout on the adapter's input during training."""

    target_modules: list[str] = field(default_factory=list)
    """Names (or name suffixes) of the linear layers that get adapters, e.g. `[q_proj, v_proj]`.
    Empty: the family's attention and MLP projections (e.g. Llama's q/k/v/o, gate/up/down)."""

    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained fully beside the adapters and saved with them, e.g. `[embed_tokens,
    lm_head]` when tokens were added to the tokenizer."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    """QLoRA: bitsandbytes' 4-bit data type of the frozen base."""

    double_quant: bool = True
    """QLoRA: quantize the quantization constants too (about 0.4 bits per weight saved)."""

    def __post_init__(self) -> None:
        _require(self.rank >= 1, "lora.rank", "must be at least 1, e.g. 16")
        _require(self.alpha > 0, "lora.alpha", "must be positive, e.g. 32")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", "must be in [0, 1), e.g. 0.05")


@dataclass(kw_only=True, slots=True)
class PreferenceConfig:
    """Preference training (`train.task: dpo | orpo | kto`)."""

    beta: float = 0.1
    """DPO and KTO: the strength of the pull towards the reference policy (TRL's `beta`). ORPO: the
    weight of the odds-ratio term beside the SFT loss (TRL's `beta`, lambda in the paper)."""

    reference: Literal["auto", "copy", "precomputed", "base"] = "auto"
    """DPO and KTO's reference policy. `copy`: a frozen copy of the starting model (partitioned
    under ZeRO-3); `precomputed`: its log-probs computed in a first pass and stored with the
    prepared data; `base`: with LoRA, the model with its adapters disabled (no second copy);
    `auto`: `base` with LoRA, `copy` otherwise. ORPO needs none."""

    desirable_weight: float = 1.0
    """KTO: weight of the desirable examples' losses (raise it when they are the rarer kind)."""

    undesirable_weight: float = 1.0
    """KTO: weight of the undesirable examples' losses."""

    def __post_init__(self) -> None:
        _require(self.beta > 0, "preference.beta", "must be positive, e.g. 0.1")
        _require(self.desirable_weight > 0, "preference.desirable_weight", "must be positive, e.g. 1.0")
        _require(self.undesirable_weight > 0, "preference.undesirable_weight", "must be positive, e.g. 1.0")


@dataclass(kw_only=True, slots=True)
class ParallelismConfig:
    """How the model is split across workers."""

    zero_stage: int = 3
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states partitioned), 2 (+
    gradients), 3 (+ parameters; the full model never sits on one worker)."""

    offload_optimizer: Offload = "none"
    """Keep optimizer states (and the update) on `cpu` or `nvme` instead of the GPU (ZeRO 1-3)."""

    offload_param: Offload = "none"
    """Keep parameters on `cpu` or `nvme` between uses (ZeRO-3 only)."""

    nvme_path: str | None = None
    """Local NVMe directory for `nvme` offload."""

    pipeline_stages: int = 1
    """Pipeline-parallel stages (DeepSpeed pipeline engine; ZeRO 0 or 1 only): the model's layers
    are split over this many workers, and the workers are divided into `workers / stages`
    data-parallel replicas. Llama, Mistral, Qwen2 and GPT-2 models; micro-batches come from
    `train.grad_accum` (use several per stage to keep the pipeline busy). See docs/pipeline.md."""

    pipeline_partition: Literal["parameters", "layers"] = "parameters"
    """How layers are assigned to pipeline stages: `parameters` balances the parameter count
    (embeddings and LM head weigh in), `layers` gives each stage the same number of decoder
    layers."""

    def __post_init__(self) -> None:
        _require(self.zero_stage in (0, 1, 2, 3), "parallelism.zero_stage", "must be 0, 1, 2 or 3")
        _require(self.pipeline_stages >= 1, "parallelism.pipeline_stages", "must be at least 1")


@dataclass(kw_only=True, slots=True)
class ResourcesConfig:
    """The hardware the job asks for."""

    nodes: int = 1
    """Number of machines."""

    gpus_per_node: int = 0
    """GPUs per machine (one training worker each). 0 trains on CPU workers."""

    gpu: str | None = None
    """GPU type, e.g. `H100-80GB`, `A100-80GB` (used by backends and the estimator)."""

    cpu_workers: int = 1
    """Training workers in total when there is no GPU (`gpus_per_node: 0`), spread over `nodes`."""

    cpus_per_worker: int = 1
    """CPU cores reserved for each training worker."""

    def __post_init__(self) -> None:
        _require(self.nodes >= 1, "resources.nodes", "must be at least 1")
        _require(self.gpus_per_node >= 0, "resources.gpus_per_node", "must be 0 or more")
        _require(self.cpu_workers >= 1, "resources.cpu_workers", "must be at least 1")
        _require(self.cpus_per_worker >= 1, "resources.cpus_per_worker", "must be at least 1")

    @property
    def num_workers(self) -> int:
        """Training workers (data-parallel x pipeline ranks) in the whole job."""
        return self.nodes * self.gpus_per_node if self.gpus_per_node else self.cpu_workers


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """When and where training state is saved."""

    every_steps: int = 0
    """Save a checkpoint every N optimizer steps (0: only at the end when `at_end` is set)."""
    background: bool = True
    """Write the periodic checkpoints (`every_steps`) in the background: training waits only
    while the state is copied to host memory, then goes on while the files are written, hashed,
    synced and committed. At most one save is in flight; a stop request and the end of training
    wait for it. The save at a stop and at the end is always written before the run ends."""

    at_end: bool = False
    """Save a checkpoint when training ends."""

    keep_last: int = 2
    """Keep this many most recent committed checkpoints; older ones are deleted only after a
    newer one is committed."""

    preempt_window_s: float | None = None
    """Seconds between a preemption signal and the hard kill. A checkpoint is saved on SIGTERM,
    SIGINT or SIGUSR1 only if the last save took less than what is left. Default: the backend's
    (`LAUNCHER_PREEMPT_WINDOW_S`; Slurm: the `--signal` lead time), else AWS 120, GCP and Azure
    30, Slurm 30 (KillWait), local 120."""

    max_worker_restarts: int = 2
    """When a worker process dies, Ray Train restarts all workers this many times; each restart
    resumes from the latest committed checkpoint."""

    export_hf_at_end: bool = False
    """Export the final checkpoint to Hugging Face safetensors in RUN_DIR/hf when training ends
    (implies saving one)."""

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "checkpoint.every_steps", "must be 0 or more")
        _require(self.keep_last >= 1, "checkpoint.keep_last", "must be at least 1")
        _require(self.max_worker_restarts >= 0, "checkpoint.max_worker_restarts", "must be 0 or more")
        _require(
            self.preempt_window_s is None or self.preempt_window_s > 0,
            "checkpoint.preempt_window_s",
            "must be a positive number of seconds",
        )


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    """Where metrics go besides `metrics.jsonl` in the run directory."""

    tensorboard: bool = True
    """Write TensorBoard event files to `<run-dir>/tensorboard`."""

    wandb_project: str | None = None
    """Log to this Weights & Biases project (needs `wandb` installed and WANDB_API_KEY set)."""

    wandb_entity: str | None = None
    """W&B entity (team or user); empty uses your default."""

    sample_ids: bool = False
    """Record in metrics.jsonl the training example indices of every step, over all ranks (an
    audit that a resume or reshard skipped and repeated nothing)."""


@dataclass(kw_only=True, slots=True)
class SampleConfig:
    """Generations printed when training ends, to see what the model learned."""

    prompts: list[str] = field(default_factory=list)
    """Prompts (raw text, or for SFT the user message) to complete."""

    from_eval: int = 0
    """Also complete the prompts of this many evaluation examples, shown next to the expected answer."""

    max_new_tokens: int = 32
    """Tokens to generate per prompt (greedy decoding)."""

    def __post_init__(self) -> None:
        _require(self.from_eval >= 0, "sample.from_eval", "must be 0 or more")
        _require(self.max_new_tokens >= 1, "sample.max_new_tokens", "must be at least 1")


@dataclass(kw_only=True, slots=True)
class Recipe:
    """A whole training job."""

    name: str
    """The run's name, used in run ids and cluster job names (letters, digits, `-`, `_`, `.`)."""

    model: ModelConfig
    """The network (see `model`)."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The tokenizer (see `tokenizer`)."""

    data: DataConfig
    """The data (see `data`)."""

    train: TrainConfig
    """The optimisation (see `train`)."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA and QLoRA adapters, for `train.method: lora | qlora` (see `lora`)."""

    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    """DPO, ORPO and KTO, for `train.task: dpo | orpo | kto` (see `preference`)."""

    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    """How the model is split (see `parallelism`)."""

    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    """The hardware (see `resources`)."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing (see `checkpoint`)."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metric sinks (see `logging`)."""

    sample: SampleConfig = field(default_factory=SampleConfig)
    """Generations at the end (see `sample`)."""

    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config entries merged last, over the generated config (expert use)."""

    def __post_init__(self) -> None:
        import re

        _require(
            bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", self.name)),
            "name",
            "use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit",
        )


SECTIONS: tuple[type, ...] = (
    Recipe,
    ModelConfig,
    TokenizerConfig,
    DataConfig,
    SyntheticDataConfig,
    TrainConfig,
    LoraConfig,
    PreferenceConfig,
    ParallelismConfig,
    ResourcesConfig,
    CheckpointConfig,
    LoggingConfig,
    SampleConfig,
)
