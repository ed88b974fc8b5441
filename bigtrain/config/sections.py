"""The run config's sections except ``resources`` (see :mod:`.resources`) and the whole (:mod:`.run`)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import ConfigDict, Field, model_validator

from bigtrain.config.base import _Section


class RunSection(_Section):
    name: str = Field("run", min_length=1, pattern=r"^[A-Za-z0-9._\-]+$")
    dir: Optional[str] = None  # default: runs/<name>


class ModelSection(_Section):
    name: Literal["gpt2", "llama", "bert", "resnet"] = "gpt2"  # causal LMs | BERT encoder | ResNet CNN
    pretrained: Optional[str] = None  # local Hugging Face directory
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_kv_head: Optional[int] = Field(None, ge=1)  # llama only; default n_head
    d_model: int = Field(256, ge=8)
    d_ff: Optional[int] = Field(None, ge=8)  # default 4*d_model (gpt2) / ~8/3*d_model (llama)
    vocab_size: Optional[int] = Field(None, ge=2)  # default: the tokenizer's
    max_seq_len: Optional[int] = Field(None, ge=1)  # default: train.seq_len
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tie_embeddings: bool = True
    rope_theta: float = Field(10000.0, gt=0)
    # resnet only: channels and residual blocks per stage, block type
    widths: list[int] = Field(default_factory=lambda: [32, 64, 128])
    depths: list[int] = Field(default_factory=lambda: [1, 1, 1])
    layer_type: Literal["basic", "bottleneck"] = "basic"

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelSection":
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        if len(self.widths) != len(self.depths) or not self.widths or min(self.widths + self.depths) < 1:
            raise ValueError(f"model.widths {self.widths} and model.depths {self.depths}: one positive entry per "
                             f"ResNet stage, same length")
        return self


class TokenizerSection(_Section):
    type: Literal["sentencepiece"] = "sentencepiece"
    model_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = Field(4096, ge=64, le=1_000_000)
    # an existing tokenizer instead of training one: a SentencePiece .model file, or a Hugging Face
    # tokenizer (a directory with tokenizer.json); default with model.pretrained: that checkpoint's
    path: Optional[str] = None
    sample_bytes: int = Field(20_000_000, ge=1000)  # corpus bytes the tokenizer trains on


class DataSourceSection(_Section):
    """One source of a mixture: its own inputs and weight; everything else comes from ``data``."""

    path: Union[str, list[str]]
    weight: float = Field(1.0, gt=0)
    download: Optional[Literal["shakespeare"]] = None
    text_field: Optional[str] = None  # default: data.text_field


class DataSection(_Section):
    path: Optional[Union[str, list[str]]] = None  # inputs (file, dir, glob; see data/sources.py) or a prepared dir
    # fetch into `path` if missing: a text corpus, or image sets (train/ and val/) for image_classification
    download: Optional[Literal["shakespeare", "digits", "synthetic-images"]] = None
    sources: Optional[list[DataSourceSection]] = None  # several inputs mixed by weight (instead of `path`)
    text_field: str = "text"  # the text field of .jsonl / column of .parquet, .tsv, HF datasets
    # sequence_classification: the label field, the label set (default: the training records'
    # distinct labels, sorted), and the held-out records (same fields as data.path)
    label_field: str = "label"
    labels: Optional[list[str]] = None
    val_path: Optional[str] = None
    reader: Literal["native", "hf"] = "native"  # "hf": read files with datasets.load_dataset(streaming=True)
    on_bad_record: Literal["error", "skip"] = "error"
    val_fraction: float = Field(0.01, gt=0.0, lt=0.5)
    cache_dir: Optional[str] = None  # default: $BIGTRAIN_CACHE or ~/.cache/bigtrain
    shard_tokens: int = Field(50_000_000, ge=1024)
    tokenizer: TokenizerSection = TokenizerSection()
    shuffle: bool = True
    shuffle_buffer: int = Field(16384, ge=1)  # samples permuted together (after a shard-level shuffle)
    num_workers: int = Field(0, ge=0)  # dataloader worker processes per rank
    prefetch_factor: int = Field(4, ge=1)  # micro-batches each worker keeps ready
    log_samples: bool = False  # write every micro-batch's sample ids to samples-rank<R>.jsonl
    mask_prob: float = Field(0.15, gt=0.0, lt=1.0)  # masked_lm: share of tokens (or words) masked
    whole_word_mask: bool = False  # masked_lm: mask whole words
    augment: bool = True  # image_classification: random crop (reflect padding) + horizontal flip

    @model_validator(mode="after")
    def _path_or_sources(self) -> "DataSection":
        if self.sources is not None and (self.path is not None or self.download is not None):
            raise ValueError("data: set either data.path (one source) or data.sources (a mixture), not both")
        if self.sources is not None and not self.sources:
            raise ValueError("data.sources: empty list (give at least one {path, weight})")
        return self

    def source_sections(self) -> list["DataSection"]:
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
    max_steps: int = Field(100, ge=1)
    global_batch_size: int = Field(16, ge=1)
    micro_batch_size: int = Field(16, ge=1)
    seq_len: int = Field(256, ge=2)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)  # 0: only at the end
    eval_batches: int = Field(20, ge=1)
    compile: bool = False
    grad_clip: float = Field(1.0, ge=0.0)  # 0 disables clipping
    sample_tokens: int = Field(64, ge=0)  # text sampled from the model at the end (0: none)
    sample_prompt: str = "\n"
    threads: Optional[int] = Field(None, ge=1)  # CPU threads per rank; default: cores / local ranks

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainSection":
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        return self


class OptimSection(_Section):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0.0, lt=10.0)
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = "auto"


class ScheduleSection(_Section):
    warmup_steps: int = Field(0, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)


# DeepSpeed keys bigtrain generates from its own config; `extra` may not override them.
_DS_MANAGED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping", "bf16", "fp16")


class DeepSpeedSection(_Section):
    stage: int = Field(2, ge=0, le=3)
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state + step on the CPU (DeepSpeed's CPU Adam)
    offload_param: bool = False  # ZeRO-Infinity style parameter offload (stage 3 only)
    extra: dict[str, Any] = Field(default_factory=dict)  # merged into the generated DeepSpeed JSON

    @model_validator(mode="after")
    def _possible(self) -> "DeepSpeedSection":
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("strategy.deepspeed.offload_optimizer needs ZeRO stage 1, 2 or 3 (stage is 0)")
        if self.offload_param and self.stage != 3:
            raise ValueError(f"strategy.deepspeed.offload_param needs ZeRO stage 3 (stage is {self.stage})")
        for key in _DS_MANAGED:
            if key in self.extra:
                raise ValueError(f"strategy.deepspeed.extra.{key}: set by bigtrain from train.*/precision; "
                                 "change those keys instead")
        zero = self.extra.get("zero_optimization", {})
        if not isinstance(zero, dict):
            raise ValueError("strategy.deepspeed.extra.zero_optimization: expected a mapping")
        if "stage" in zero:
            raise ValueError("strategy.deepspeed.extra.zero_optimization.stage: use strategy.deepspeed.stage")
        for key, flag in (("offload_optimizer", self.offload_optimizer), ("offload_param", self.offload_param)):
            if key in zero and not flag and "optimizer" not in self.extra:
                raise ValueError(
                    f"strategy.deepspeed.extra.zero_optimization.{key}: ZeRO-Offload cannot step a client "
                    f"(torch) optimizer; set strategy.deepspeed.{key}: true so bigtrain configures DeepSpeed's CPU Adam")
        return self


class FSDPSection(_Section):
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    replicate: int = Field(1, ge=1)  # HSDP: replicate x shard = world size
    shard: Optional[int] = Field(None, ge=1)


class StrategySection(_Section):
    name: Literal["single", "ddp", "fsdp", "deepspeed"] = "single"
    activation_checkpointing: bool = False
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    fsdp: FSDPSection = FSDPSection()


class CheckpointSection(_Section):
    every_steps: int = Field(0, ge=0)  # 0: no step-based saves
    every_minutes: float = Field(0.0, ge=0.0)  # 0: no time-based saves
    keep_last: int = Field(2, ge=1)
    keep_every: int = Field(0, ge=0)  # also keep every checkpoint whose step is a multiple (0: none)
    async_: bool = Field(False, alias="async")  # write while training continues (one in flight)
    resume: str = Field("auto", min_length=1)  # auto | never | PATH to a step-N directory
    save_final: bool = True
    save_on_preempt: bool = True  # SIGTERM/SIGUSR1: save at the next step, exit with code 75
    on_save_error: Literal["stop", "continue"] = "stop"
    verify: Literal["checksum", "size"] = "checksum"  # how resume checks a checkpoint's files

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class WandbSection(_Section):
    mode: Literal["online", "offline", "disabled"] = "disabled"
    project: str = "bigtrain"
    entity: Optional[str] = None
    tags: list[str] = Field(default_factory=list)


class TrackingSection(_Section):
    wandb: WandbSection = WandbSection()
    console: Literal["auto", "progress", "plain"] = "auto"
