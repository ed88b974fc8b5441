"""Import a GGUF file (llama.cpp's format) as a Hugging Face model directory.

    python -m bigtrain.import_gguf FILE OUT [--force]      (what ``bigtrain import gguf`` runs)

transformers reads the file (``from_pretrained(folder, gguf_file=...)``), dequantizing its
tensors to fp32, and converts its tokenizer (chat template included) to a fast tokenizer. The
weights are then copied into a plain model built from the same config without its
``quantization_config``, and written as safetensors with the tokenizer files, so the directory
loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` like any Hub checkpoint and can be
``model.pretrained`` of a run. The written directory is reloaded and must give the GGUF model's
logits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bigtrain.exit_codes import BAD_INPUT, OK


class GGUFImportError(ValueError):
    """A one-line problem with the input file or the output directory."""


def import_gguf(gguf: Path, out: Path, force: bool = False, log=print) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from bigtrain.export import checked_reload, written_into

    hf_logging.disable_progress_bar()
    gguf = Path(gguf)
    if not gguf.is_file():
        raise GGUFImportError(f"{gguf}: no such file")
    if out.exists() and any(out.iterdir()) and not force:
        raise GGUFImportError(f"{out}: exists and is not empty (pass --force to replace it)")
    try:
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                         local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except (ValueError, OSError, KeyError) as err:  # not GGUF, an architecture transformers cannot read, ...
        raise GGUFImportError(f"{gguf}: transformers cannot load it ({str(err).splitlines()[0]})") from None
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(quantized.state_dict())

    with written_into(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    diff = checked_reload(out, "AutoModelForCausalLM", quantized, {"input_ids": ids}, "the GGUF model's",
                          GGUFImportError)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"imported {gguf} ({config.model_type}, {n_params / 1e6:.1f}M params, dequantized to fp32; chat template: "
        f"{'yes' if tokenizer.chat_template else 'no'}) -> {out}; max |logit difference| after reload: {diff:.2e}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bigtrain import gguf", description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=Path, help="the .gguf file")
    parser.add_argument("out", type=Path, help="the Hugging Face directory to write")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)
    try:
        import_gguf(args.gguf, args.out, args.force)
        return OK
    except GGUFImportError as err:  # one line: the CLI's own errors look the same
        print(f"error: {err}", file=sys.stderr)
    return BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
