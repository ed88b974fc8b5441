"""``python -m bigtrain.convert`` (what ``bigtrain convert`` runs)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from bigtrain.checkpoint import CheckpointError
from bigtrain.convert.core import TARGETS, convert_checkpoint
from bigtrain.exit_codes import BAD_INPUT, OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bigtrain convert",
                                     description="write a run's checkpoint as another engine's, into a new run "
                                                 "directory (OUT_DIR/checkpoints/step-N) to resume or export")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest valid one)")
    parser.add_argument("--to", choices=TARGETS, required=True, help="the engine to convert to")
    parser.add_argument("--stage", type=int, default=None, help="ZeRO stage for --to deepspeed (default 2)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks the converted checkpoint is for (default: the source's; RNG states are "
                             "carried only at the same world size)")
    args = parser.parse_intermixed_args(argv)
    if args.stage is not None and args.to != "deepspeed":
        parser.error("--stage is for --to deepspeed")
    from bigtrain.export import find_checkpoint

    try:
        src = find_checkpoint(args.run_dir, args.step)
        out = args.out / "checkpoints" / src.name
        if out.exists():
            raise CheckpointError(f"{out}: exists")
        stage = (args.stage if args.stage is not None else 2) if args.to == "deepspeed" else None
        convert_checkpoint(src, out, (args.to, stage), args.world_size, run_dir=args.run_dir)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return BAD_INPUT
    shutil.copy(out / "config.yaml", args.out / "config.yaml")  # the run directory's config, as training writes
    return OK


if __name__ == "__main__":
    sys.exit(main())
