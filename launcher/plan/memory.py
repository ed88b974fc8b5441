"""Per-rank memory of a training step, term by term, from a model :class:`~launcher.plan.shapes.Shape`
and a :class:`Setup` (engine, ZeRO stage, precision, micro-batch, world size). No torch.

Model states follow what each engine allocates (``bigtrain/strategies/``):

- single / ddp: fp32 parameters, fp32 gradients (DDP's buckets are the gradients:
  ``gradient_as_bucket_view``), Adam's two fp32 moments; under bf16/fp16 autocast also a
  low-precision copy of every matmul weight, cached by autocast and saved for backward.
- fsdp (FSDP2): fp32 parameter, gradient and moment shards (1/shard of each); while a block runs its
  parameters are all-gathered in the compute dtype (the root's stay gathered from forward to
  backward; the next block is prefetched) and its gradients reduce-scattered in fp32.
- deepspeed: the module's parameters in the compute dtype (whole below stage 3, 1/N at stage 3),
  an fp32 master partition and the moments over it (1/N from stage 1; bf16 at stage 0 partitions
  too, as DeepSpeed's BF16_Optimizer does), gradients whole in the compute dtype up to stage 1 and
  1/N from stage 2, the reduce bucket (and at stage 3 the prefetch bucket and the gathered block);
  the optimizer step adds the fp32 gradient partition and the all-gather bucket.
  ``offload_optimizer`` moves master, moments and fp32 gradients to host memory,
  ``offload_param`` the parameter partition.

Activations are what autograd saves for backward, counted tensor by tensor for the transformers
GPT-2 and Llama blocks with SDPA attention (fused kernels: nothing quadratic in the sequence) and
no dropout, in three regimes: fp32; ``low`` (FSDP and DeepSpeed cast the model to bf16/fp16: every
activation in that dtype, except what the code upcasts itself); ``autocast`` (single/ddp in
bf16/fp16: matmul inputs and outputs in bf16, the residual stream, norms and the ops CUDA autocast
runs in fp32 in fp32). ``train.compile`` saves what backward cannot recompute cheaply (the inputs
of every matmul and of attention, the residual stream) and recomputes pointwise chains such as
GELU's. Activation checkpointing keeps each block's input and recomputes one block at a time.
The loss adds a transient of 12 bytes per token per vocabulary entry at the start of backward
(fp32 log-softmax output, its gradient and the logits' gradient).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bigtrain.config import RunConfig
from launcher.plan.shapes import Shape

LOSS_BYTES_PER_LOGIT = 12  # fp32 log-softmax output + its gradient + the logits' gradient


def default_bucket(n_params: int) -> int:
    """DeepSpeed's bucket elements as bigtrain configures them (``bigtrain.strategies.deepspeed._bucket``)."""
    return int(min(5e8, max(1e5, n_params // 4)))


@dataclass(frozen=True)
class Setup:
    """The settings the planner reads: from a config (:meth:`from_config`), or varied by a suggestion."""

    precision: str
    strategy: str
    world: int = 1
    nodes: int = 1
    micro_batch: int = 1
    global_batch: int = 1
    seq_len: int = 1024
    activation_checkpointing: bool = False
    compile: bool = False
    stage: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    reshard_after_forward: bool = True
    fsdp_offload: bool = False
    fsdp_replicate: int = 1
    fsdp_shard: int | None = None
    bucket: int | None = None  # DeepSpeed bucket elements; None: bigtrain's default for the model

    @classmethod
    def from_config(cls, cfg: RunConfig, world: int, nodes: int) -> Setup:
        s = cfg.strategy
        zero = s.deepspeed.extra.get("zero_optimization", {})
        bucket = zero.get("reduce_bucket_size")
        return cls(precision=cfg.precision, strategy=s.name, world=world, nodes=nodes,
                   micro_batch=cfg.train.micro_batch_size, global_batch=cfg.train.global_batch_size,
                   seq_len=cfg.train.seq_len, activation_checkpointing=s.activation_checkpointing,
                   compile=cfg.train.compile, stage=s.deepspeed.stage, offload_optimizer=s.deepspeed.offload_optimizer,
                   offload_param=s.deepspeed.offload_param, reshard_after_forward=s.fsdp.reshard_after_forward,
                   fsdp_offload=s.fsdp.cpu_offload, fsdp_replicate=s.fsdp.replicate, fsdp_shard=s.fsdp.shard,
                   bucket=int(bucket) if isinstance(bucket, (int, float)) else None)

    @property
    def low_precision(self) -> bool:
        return self.precision in ("bf16", "fp16")

    @property
    def compute_bytes(self) -> int:
        return 2 if self.low_precision else 4

    @property
    def regime(self) -> str:
        """fp32, autocast (single/ddp in bf16/fp16) or low (the engine casts the model)."""
        if not self.low_precision:
            return "fp32"
        return "autocast" if self.strategy in ("single", "ddp") else "low"

    @property
    def offloads(self) -> bool:
        """The engine keeps optimizer state on the host and steps there."""
        return (self.strategy == "deepspeed" and self.offload_optimizer) or (self.strategy == "fsdp"
                                                                             and self.fsdp_offload)

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch."""
        return self.micro_batch * self.seq_len

    @property
    def accumulation(self) -> int:
        return max(1, self.global_batch // (self.micro_batch * self.world))

    @property
    def shards(self) -> int:
        """Ranks the model states are sharded over (1: replicated)."""
        if self.strategy == "fsdp":
            return self.fsdp_shard or max(1, self.world // self.fsdp_replicate)
        if self.strategy == "deepspeed":
            return self.world
        return 1

    def label(self) -> str:
        if self.strategy == "deepspeed":
            name = f"ZeRO-{self.stage}"
            name += " + optimizer offload" if self.offload_optimizer else ""
            name += " + param offload" if self.offload_param else ""
        else:
            name = self.strategy + (" + cpu offload" if self.strategy == "fsdp" and self.fsdp_offload else "")
        return name

    def overrides(self, other: Setup) -> list[str]:
        """The dotted overrides (and command-line changes) that turn this setup into ``other``."""
        out = []
        for attr, key in (("strategy", "strategy.name"), ("stage", "strategy.deepspeed.stage"),
                          ("offload_optimizer", "strategy.deepspeed.offload_optimizer"),
                          ("offload_param", "strategy.deepspeed.offload_param"),
                          ("reshard_after_forward", "strategy.fsdp.reshard_after_forward"),
                          ("fsdp_offload", "strategy.fsdp.cpu_offload"),
                          ("activation_checkpointing", "strategy.activation_checkpointing"),
                          ("micro_batch", "train.micro_batch_size")):
            new = getattr(other, attr)
            if new != getattr(self, attr) and (attr != "stage" or other.strategy == "deepspeed"):
                out.append(f"{key}={str(new).lower() if isinstance(new, bool) else new}")
        return out


# -- activations -------------------------------------------------------------------------------
# Bytes saved for backward per token and layer, in units of d_model, by architecture, regime and
# eager/compiled; F = d_ff / d_model, r = kv heads / heads. Derivations (GPT-2, eager, fp32):
# ln_1 input 4, c_attn input 4, q/k/v 12 (views of one output), SDPA output 4 and the contiguous
# copy c_proj reads 4, ln_2 input 4, c_fc input 4, GELU: one kernel (gelu_pytorch_tanh, as bigtrain
# builds GPT-2) keeps its input and c_proj reads its result (2 x 4F); the element-wise chain of
# gelu_new (GPT-2 checkpoints), eager, keeps pow input, tanh output, 0.5x, 1+tanh, result (5 x 4F).
# Under autocast the matmul inputs are bf16 copies (2), the residual stream stays fp32 (4); the one
# kernel runs in bf16 (2 x 2F), the chain's pow/tanh in fp32 (4F+4F+2F+4F+2F). Compiled, either
# GELU keeps only its input and the result c_proj reads. Llama: RMSNorm keeps its input, the normalised
# value and (fp32) its output (under autocast one bf16 copy per projection that reads it); RoPE
# makes new q/k (fp32 under autocast, cast back for SDPA); SwiGLU keeps gate, SiLU, up and product.
def _layer_units(shape: Shape, regime: str, compiled: bool) -> float:
    f = shape.d_ff / shape.d_model
    r = shape.n_kv_head / shape.n_head
    if shape.arch == "gpt2":
        one_kernel = {"fp32": 36 + 8 * f, "low": 18 + 4 * f, "autocast": 22 + 4 * f}
        chain = {"fp32": 36 + 20 * f, "low": 18 + 10 * f, "autocast": 22 + 16 * f}
        return (chain if shape.gelu_chain and not compiled else one_kernel)[regime]
    table = {("fp32", False): 36 + 8 * r + 16 * f, ("low", False): 22 + 4 * r + 8 * f,
             ("autocast", False): 32 + 4 * r + 8 * f,
             ("fp32", True): 28 + 8 * r + 12 * f, ("low", True): 14 + 4 * r + 6 * f,
             ("autocast", True): 18 + 4 * r + 6 * f}
    return table[regime, compiled]


def _residual_bytes(regime: str) -> int:
    """One element of the residual stream (a block's input: what activation checkpointing keeps)."""
    return 2 if regime == "low" else 4


def _head_units(shape: Shape, regime: str) -> float:
    """After the blocks: the final norm's saved tensors and the output projection's input."""
    if shape.arch == "gpt2":
        return {"fp32": 8, "low": 4, "autocast": 6}[regime]
    return {"fp32": 12, "low": 8, "autocast": 10}[regime]


@dataclass(frozen=True)
class Activations:
    saved: float  # held from forward into backward
    transient: float  # on top, at its largest: the loss at the start of backward, or one recomputed block

    @property
    def total(self) -> float:
        return self.saved + self.transient


def activations(shape: Shape, setup: Setup, checkpointing: bool | None = None) -> Activations:
    """Activation bytes of one micro-batch on one rank (``checkpointing`` defaults to the setup's)."""
    ac = setup.activation_checkpointing if checkpointing is None else checkpointing
    regime, t, h = setup.regime, setup.tokens, shape.d_model
    layer = _layer_units(shape, regime, setup.compile) * h * t
    head = _head_units(shape, regime) * h * t + 8 * t  # + the token ids the embedding keeps
    loss = LOSS_BYTES_PER_LOGIT * shape.vocab * t
    if not ac:
        return Activations(saved=shape.n_layer * layer + head, transient=loss)
    inputs = shape.n_layer * _residual_bytes(regime) * h * t
    return Activations(saved=inputs + head, transient=max(loss, layer))


# -- the whole rank ----------------------------------------------------------------------------
@dataclass
class Estimate:
    """Bytes per rank. Device memory peaks at the larger of two phases: backward (states, copies,
    buffers, activations) and the optimizer step (states and what the step allocates)."""

    params: float
    grads: float
    optimizer: float
    master: float = 0.0  # fp32 master copies kept apart from the parameters (DeepSpeed)
    weight_copies: float = 0.0  # autocast's low-precision weight copies
    buffers: float = 0.0  # FSDP's gathered blocks, ZeRO's buckets and gathered parameters
    activations: Activations = field(default_factory=lambda: Activations(0, 0))
    activations_ac: Activations = field(default_factory=lambda: Activations(0, 0))
    activations_no_ac: Activations = field(default_factory=lambda: Activations(0, 0))
    step_extra: float = 0.0  # allocated only by the optimizer step
    offloaded: dict[str, float] = field(default_factory=dict)  # host memory, by term (CPU offload)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def host(self) -> float:
        return sum(self.offloaded.values())

    @property
    def states(self) -> float:
        return self.params + self.grads + self.optimizer + self.master

    @property
    def backward_peak(self) -> float:
        return self.states + self.weight_copies + self.buffers + self.activations.total

    @property
    def step_peak(self) -> float:
        return self.states + self.step_extra

    @property
    def peak(self) -> float:
        return max(self.backward_peak, self.step_peak)

    def peak_with(self, checkpointing: bool) -> float:
        """The peak with activation checkpointing on or off, everything else as it is."""
        acts = self.activations_ac if checkpointing else self.activations_no_ac
        return max(self.backward_peak - self.activations.total + acts.total, self.step_peak)

    def terms(self) -> list[tuple[str, float, str]]:
        """(name, bytes, how it was counted) for display."""
        act = self.activations
        return [
            ("parameters", self.params, self.notes.get("params", "")),
            ("gradients", self.grads, self.notes.get("grads", "")),
            ("optimizer state", self.optimizer, self.notes.get("optimizer", "")),
            ("fp32 master copies", self.master, self.notes.get("master", "")),
            ("autocast weight copies", self.weight_copies, self.notes.get("weight_copies", "")),
            ("engine buffers", self.buffers, self.notes.get("buffers", "")),
            ("activations (saved)", act.saved, self.notes.get("activations", "")),
            ("loss / recompute transient", act.transient, ""),
            ("optimizer step extra", self.step_extra, self.notes.get("step_extra", "")),
        ]


def estimate(shape: Shape, setup: Setup) -> Estimate:
    """Per-rank bytes of ``setup`` training ``shape``."""
    p, c, n = shape.params, setup.compute_bytes, setup.shards
    block = shape.block_params
    est = Estimate(params=4 * p, grads=4 * p, optimizer=8 * p,
                   activations=activations(shape, setup),
                   activations_ac=activations(shape, setup, True),
                   activations_no_ac=activations(shape, setup, False))
    if setup.strategy in ("single", "ddp"):
        est.notes.update(params="fp32", grads="fp32", optimizer="Adam m, v (fp32)")
        if setup.regime == "autocast":
            est.weight_copies = 2 * shape.matmul_params
            est.notes["weight_copies"] = f"{setup.precision} copies of the matmul weights"
    elif setup.strategy == "fsdp":
        est.params, est.grads, est.optimizer = 4 * p / n, 4 * p / n, 8 * p / n
        est.notes.update(params=f"fp32 shards (1/{n})", grads=f"fp32 shards (1/{n})",
                         optimizer=f"Adam m, v shards (1/{n})")
        if setup.reshard_after_forward:
            est.buffers = c * shape.root_params + 2 * c * block + 4 * block
            est.notes["buffers"] = "gathered root + 2 blocks, one block's fp32 gradients"
        else:
            est.buffers = c * p + 4 * block
            est.notes["buffers"] = "every block stays gathered from forward to backward"
        est.step_extra = 4 * p / n  # foreach AdamW's temporaries
        if setup.fsdp_offload:
            est.offloaded = {"params": est.params, "grads": est.grads, "optimizer": est.optimizer}
            est.params = est.grads = est.optimizer = est.step_extra = 0.0
            est.notes.update(params="on the host", grads="on the host", optimizer="on the host")
    elif setup.strategy == "deepspeed":
        _deepspeed(shape, setup, est)
    return est


def _deepspeed(shape: Shape, setup: Setup, est: Estimate) -> None:
    p, c, n, stage = shape.params, setup.compute_bytes, setup.world, setup.stage
    bucket = c * (setup.bucket or default_bucket(p))
    partitioned = stage >= 1 or setup.precision == "bf16"  # BF16_Optimizer partitions at stage 0 too
    est.params = c * p / n if stage == 3 else c * p
    est.notes["params"] = f"{setup.precision} " + (f"partition (1/{n})" if stage == 3 else "(whole)")
    if setup.low_precision or stage >= 1:
        est.master = 4 * p / n if partitioned else 4 * p
        est.notes["master"] = f"fp32 partition (1/{n})" if partitioned else "fp32 (whole)"
    est.optimizer = 8 * p / n if partitioned else 8 * p
    est.notes["optimizer"] = f"Adam m, v over the fp32 partition (1/{n})" if partitioned else "Adam m, v"
    if stage >= 2:
        est.grads, est.notes["grads"] = c * p / n, f"{setup.precision} partition (1/{n})"
    elif stage == 0 and setup.precision == "bf16":
        est.grads, est.notes["grads"] = 4 * p, "fp32 accumulation (whole)"
    else:
        est.grads, est.notes["grads"] = c * p, f"{setup.precision} (whole until reduced)"
    fp32_grad_partition = 4 * p / n if stage >= 1 else 0.0
    if stage == 3:
        est.buffers = 2 * bucket + c * shape.block_params
        est.notes["buffers"] = "reduce + prefetch buckets, the gathered block"
        allgather = 0.0
    else:
        est.buffers = bucket if stage >= 1 else 0.0
        est.notes["buffers"] = "reduce bucket" if stage >= 1 else ""
        allgather = bucket if stage >= 1 else 0.0
    est.step_extra = fp32_grad_partition + 4 * p / n + allgather  # + foreach AdamW's temporaries
    est.notes["step_extra"] = "fp32 gradient partition, AdamW temporaries, all-gather bucket"
    if setup.offload_optimizer:
        est.offloaded = {"master": est.master, "optimizer": est.optimizer, "fp32 grads": fp32_grad_partition}
        est.master = est.optimizer = 0.0
        est.step_extra = allgather
        est.notes.update(master="on the host", optimizer="on the host (DeepSpeed CPU Adam)")
    if setup.offload_param and stage == 3:
        est.offloaded["params"] = est.params
        est.params = 0.0
        est.notes["params"] = "on the host"
