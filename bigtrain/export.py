"""Export a checkpoint of any engine to a Hugging Face directory.

    python -m bigtrain.export RUN_DIR [--step N] --to hf OUT      (what ``bigtrain export`` runs)

Writes ``config.json``, ``model.safetensors`` (consolidated from shards), ``generation_config.json``
and the tokenizer for ``AutoTokenizer`` (text tasks: the run's Hugging Face tokenizer files as they
were, or a ``tokenizer.json`` converted from bigtrain's SentencePiece ``tokenizer.model``, which is
copied too), then reloads the directory with the task's Auto class
(``AutoModelForCausalLM``, ``AutoModelForMaskedLM``, ``AutoModelForSequenceClassification``,
``AutoModelForImageClassification``) and
checks that it gives the same logits as the checkpointed model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from bigtrain.checkpoint import CheckpointError, best_checkpoint, list_checkpoints, verify
from bigtrain.config import ConfigError, validate
from bigtrain.data.tokenizer import AnyTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from bigtrain.exit_codes import BAD_INPUT, OK
from bigtrain.models import build_causal_lm
from bigtrain.tasks import task_class
from bigtrain.tasks.base import HF_CONFIG


def find_checkpoint(run_dir: Path, step: int | None, best: bool = False, who: str = "export") -> Path:
    """Checkpoint ``step``, the best by the run's ``checkpoint.keep_best`` (default: lowest val_loss),
    or the newest valid one (``who`` reads it: named in the warnings and errors)."""
    root = Path(run_dir) / "checkpoints"
    if best:
        return _best(run_dir, root)
    if step is not None:
        path = root / f"step-{step}"
        verify(path)
        return path
    for path in list_checkpoints(root):
        try:
            verify(path)
            return path
        except CheckpointError as err:
            print(f"{who}: skipping {path.name}: {err}", file=sys.stderr)
    raise CheckpointError(f"{root}: no valid checkpoint to {who}")


def _best(run_dir: Path, root: Path) -> Path:
    config = Path(run_dir) / "config.yaml"
    saved = (yaml.safe_load(config.read_text()) or {}) if config.is_file() else {}
    keep = (saved.get("checkpoint") or {}).get("keep_best") or {"metric": "val_loss", "mode": "min"}
    found = best_checkpoint(list_checkpoints(root), keep["metric"], keep.get("mode", "min"))
    if found is None:
        raise CheckpointError(f"{root}: no checkpoint was saved at an evaluation step with {keep['metric']} "
                              f"(--best picks among checkpoints written where the run evaluated)")
    verify(found[0])
    print(f"export: best checkpoint {found[0].name} ({keep['metric']} {found[1]:.4f})", file=sys.stderr)
    return found[0]


def load_model_weights(strategy: str, ckpt: Path, model: torch.nn.Module, partial: bool = False) -> None:
    """Load a checkpoint's (possibly sharded) weights into a plain, unwrapped model on CPU
    (``partial``: a LoRA checkpoint, which holds the trainable parameters alone)."""
    if strategy in ("single", "ddp"):
        from bigtrain.strategies.single import load_model_file

        load_model_file(model, ckpt, partial=partial)
    elif strategy == "fsdp":
        from bigtrain.strategies.fsdp import load_consolidated

        load_consolidated(model, ckpt, partial)
    elif strategy == "deepspeed":
        from bigtrain.strategies.deepspeed import load_consolidated

        load_consolidated(model, ckpt, partial)
    else:
        raise CheckpointError(f"{ckpt}: unknown strategy '{strategy}' in manifest")


def hf_tokenizer(tokenizer_file: Path):
    """A ``PreTrainedTokenizerFast`` equivalent to bigtrain's SentencePiece model."""
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    extractor = SentencePieceExtractor(str(tokenizer_file))
    proto = extractor.proto
    if proto.trainer_spec.model_type == 1:  # unigram
        model = models.Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=proto.trainer_spec.unk_id,
                               byte_fallback=True)
    else:
        parts = extractor.extract(models.BPE)
        model = models.BPE(vocab=parts["vocab"], merges=parts["merges"], unk_token="<unk>", byte_fallback=True,
                           fuse_unk=True)
    tok = HFTokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens([AddedToken(p.piece, normalized=False, special=False) for p in proto.pieces if p.type == 4])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_empty_model(cfg, ckpt: Path, run_dir: Path, vocab_size: int | None) -> torch.nn.Module:
    """The checkpoint's model, freshly initialised: from its ``hf_config.json``, or (checkpoints
    written before it existed) from the bigtrain config and the tokenizer's vocabulary."""
    import transformers

    auto = getattr(transformers, task_class(cfg.task).auto_class)
    config_file = next((p for p in (ckpt / HF_CONFIG, run_dir / HF_CONFIG) if p.is_file()), None)
    if config_file is not None:
        config = transformers.AutoConfig.for_model(**json.loads(config_file.read_text()))
        return auto.from_config(config, dtype=torch.float32)
    if cfg.task != "causal_lm" or vocab_size is None:
        raise CheckpointError(f"{ckpt}: no {HF_CONFIG} to rebuild the model from")
    return build_causal_lm(cfg.model.model_copy(update={"pretrained": None}), vocab_size, cfg.train.seq_len)


def build_lora_model(cfg, ckpt: Path, run_dir: Path) -> torch.nn.Module:
    """A LoRA run's model: its base from ``model.pretrained`` (the checkpoint holds the adapters
    alone), shaped by the run's ``hf_config.json`` (a classifier's labels), with fresh adapters."""
    import transformers

    from bigtrain.models.gpt import load_pretrained
    from bigtrain.models.lora import apply_lora

    if not (Path(cfg.model.pretrained) / "config.json").is_file():
        raise CheckpointError(f"{ckpt}: a LoRA checkpoint holds the adapters alone; its base model "
                              f"(model.pretrained: {cfg.model.pretrained}) is no longer there")
    auto = getattr(transformers, task_class(cfg.task).auto_class)
    config_file = next((p for p in (ckpt / HF_CONFIG, run_dir / HF_CONFIG) if p.is_file()), None)
    kwargs = {}
    if config_file is not None:
        kwargs = {"config": transformers.AutoConfig.for_model(**json.loads(config_file.read_text())),
                  "ignore_mismatched_sizes": True}
    return apply_lora(load_pretrained(auto, cfg.model.pretrained, **kwargs), cfg.model.lora, cfg.task)


def check_inputs(model: torch.nn.Module, cfg, tokenizer: AnyTokenizer | None, sample: str) -> dict:
    """Inputs to compare the exported model's outputs with the checkpoint's."""
    if not cfg.text_task:  # a ResNet takes any image size
        gen = torch.Generator().manual_seed(0)
        return {"pixel_values": torch.randn(2, model.config.num_channels, 32, 32, generator=gen)}
    return {"input_ids": torch.tensor([tokenizer.encode(sample)[: cfg.train.seq_len]])}


@contextlib.contextmanager
def written_into(out: Path) -> Iterator[Path]:
    """A fresh directory beside ``out`` to fill; renamed to ``out`` (replacing it) when the block
    ends without an error, so ``out`` is never half-written."""
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def checked_reload(out: Path, auto_class: str, model: torch.nn.Module, inputs: dict, source: str,
                   error: type[Exception] = CheckpointError) -> float:
    """The largest |logit difference| on ``inputs`` between ``model`` (the ``source``) and the
    directory ``out`` reloaded with transformers' ``auto_class``; ``error`` above 1e-4."""
    import transformers

    reloaded = getattr(transformers, auto_class).from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        diff = (reloaded(**inputs).logits - model(**inputs).logits).abs().max().item()
    if diff > 1e-4:
        raise error(f"{out}: reloaded model's logits differ from {source} by {diff:.2e}")
    return diff


def export_hf(run_dir: Path, out: Path, step: int | None = None, force: bool = False,
              log=print, best: bool = False, adapter: bool = False) -> Path:
    """Write the checkpoint as a Hugging Face directory and check that it reloads with the same
    logits. LoRA runs: the adapters merged into the base (default), or with ``adapter`` a peft
    adapter directory (``PeftModel.from_pretrained(base, OUT)``)."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    run_dir = Path(run_dir)
    ckpt = find_checkpoint(run_dir, step, best)
    manifest = verify(ckpt, "size")
    try:
        cfg = validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
    except ConfigError as err:
        raise CheckpointError(f"{ckpt / 'config.yaml'}: {err}") from None
    tok_file = next((d / name for d in (ckpt, run_dir) for name in (HFTokenizer.main_file, Tokenizer.main_file)
                     if (d / name).is_file()), None)
    if cfg.text_task and tok_file is None:
        raise CheckpointError(f"{run_dir}: no tokenizer.json or tokenizer.model in the checkpoint or the run directory")
    tokenizer = load_tokenizer(tok_file) if cfg.text_task else None
    if out.exists() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{out}: exists and is not empty (pass --force to replace it)")

    if adapter and cfg.model.lora is None:
        raise CheckpointError(f"{ckpt}: --adapter exports LoRA adapters; this run trained every weight (no model.lora)")
    torch.manual_seed(0)
    if cfg.model.lora is not None:
        model = build_lora_model(cfg, ckpt, run_dir)
        load_model_weights(manifest["strategy"], ckpt, model, partial=True)
    else:
        model = build_empty_model(cfg, ckpt, run_dir, tokenizer.vocab_size if tokenizer else None)
        load_model_weights(manifest["strategy"], ckpt, model)
    model.eval()
    sample = "First Citizen:\nBefore we proceed any further, hear me speak.\n\tcafé"
    inputs = check_inputs(model, cfg, tokenizer, sample)
    with torch.no_grad():
        reference = model(**inputs).logits  # the training model's (with its adapters, unmerged)
    if cfg.model.lora is not None and not adapter:
        model = model.merge_and_unload()

    with written_into(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if isinstance(tokenizer, HFTokenizer):
            tokenizer.save_files(tmp)
        elif tokenizer is not None:
            shutil.copy(tok_file, tmp / "tokenizer.model")
            hf_tok = hf_tokenizer(tok_file)
            if hf_tok.encode(sample, add_special_tokens=False) == tokenizer.encode(sample):
                hf_tok.save_pretrained(tmp)
            else:
                log("export: WARNING the Hugging Face tokenizer does not reproduce the SentencePiece ids; "
                    "only tokenizer.model is exported")

    # Check: the exported directory gives the checkpoint's outputs.
    auto_class = task_class(cfg.task).auto_class
    if adapter:
        from peft import PeftModel

        base = build_lora_model(cfg, ckpt, run_dir).get_base_model()  # the adapters come from OUT
        reloaded = PeftModel.from_pretrained(base, out).eval()
        how = f"PeftModel.from_pretrained({auto_class}.from_pretrained({cfg.model.pretrained}), OUT)"
    else:
        reloaded = getattr(transformers, auto_class).from_pretrained(out, local_files_only=True).eval()
        how = auto_class + (" (LoRA adapters merged)" if cfg.model.lora is not None else "")
        if getattr(reloaded.config, "auto_map", None):  # e.g. the CIFAR-stem ResNet: its code is in OUT
            how += ".from_pretrained(OUT, trust_remote_code=True)"
    with torch.no_grad():
        diff = (reloaded(**inputs).logits - reference).abs().max().item()
    log(f"exported {ckpt} ({cfg.task}, {manifest['strategy']}, {manifest['world_size']} ranks) -> {out}; "
        f"reload with {how}; max |logit difference| after reload: {diff:.2e}")
    if diff > 1e-4:
        raise CheckpointError(f"{out}: reloaded model's logits differ from the checkpoint's by {diff:.2e}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bigtrain export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest valid)")
    parser.add_argument("--to", choices=["hf"], default="hf", help="output format")
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--out", dest="out_opt", type=Path)
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--best", action="store_true", help="the best checkpoint (checkpoint.keep_best's metric)")
    parser.add_argument("--adapter", action="store_true", help="LoRA runs: the adapters alone (peft), not merged")
    args = parser.parse_intermixed_args(argv)
    out = args.out or args.out_opt
    if out is None:
        parser.error("missing the output directory (bigtrain export RUN_DIR --to hf OUT)")
    if args.best and args.step is not None:
        parser.error("--best and --step choose a checkpoint each: give one")
    try:
        export_hf(args.run_dir, out, args.step, args.force, best=args.best, adapter=args.adapter)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return BAD_INPUT
    return OK


if __name__ == "__main__":
    sys.exit(main())
