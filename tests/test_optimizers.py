"""optim.name (adamw, sgd, rmsprop, adafactor, lion) and the schedules: each optimizer trains the
tiny GPT and ResNet, resumes bit-identically on one process and at 2 ranks under fsdp and
DeepSpeed ZeRO; lr_at of the step and onecycle schedules; keys that do not apply are errors."""

from __future__ import annotations

import functools
import re
import shutil

import pytest

from bigtrain.config import ScheduleSection
from bigtrain.optim import lr_at
from conftest import ENGINES, ROOT, run_cli, train_args
from test_checkpoint import losses, ok
from test_tasks import images

STEPS = 6  # a checkpoint at 3, the final one at 6
# each optimizer's learning rate for the tiny GPT, and the class the run header names
OPTIMIZERS = {
    "adamw": ("optim.lr=3e-3", "AdamW"),
    "sgd": ("optim.lr=0.5", "SGD"),
    "rmsprop": ("optim.lr=1e-3", "RMSprop"),
    "adafactor": ("optim.lr=3e-3", "Adafactor"),
    "lion": ("optim.lr=1e-3", "Lion"),
}


def gpt_args(run_dir, cache_dir, tiny_text, name, *extra):
    return train_args(run_dir, cache_dir, tiny_text, f"optim.name={name}", OPTIMIZERS[name][0],
                      f"train.max_steps={STEPS}", "train.sample_tokens=0", "checkpoint.every_steps=3",
                      "checkpoint.keep_last=10", *extra)


def resumes_exactly(run_dir, argv) -> dict[int, float]:
    """Drop the final checkpoint of a finished run, run again from step 3: the same losses, every step."""
    full = losses(run_dir)
    assert sorted(full) == list(range(1, STEPS + 1))
    shutil.rmtree(run_dir / "checkpoints" / f"step-{STEPS}")
    again = ok(run_cli(*argv))
    assert f"resumed from {run_dir / 'checkpoints' / 'step-3'}" in again.stdout, again.stdout[-2000:]
    assert losses(run_dir) == full
    return full


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory, cache_dir, tiny_text):
    """``single_runs(name)`` -> (run_dir, argv, stdout) of the optimizer's 1-process run, made on first use."""
    @functools.cache
    def get(name):
        run_dir = tmp_path_factory.mktemp(f"single-{name}") / "run"
        argv = gpt_args(run_dir, cache_dir, tiny_text, name)
        return run_dir, argv, ok(run_cli(*argv)).stdout

    return get


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_trains_the_gpt_and_resumes_exactly(single_runs, name):
    run_dir, argv, stdout = single_runs(name)
    assert f"optimizer {OPTIMIZERS[name][1]}," in stdout
    loss = losses(run_dir)
    assert loss[STEPS] < loss[1] - 0.2, loss
    assert sum(loss[s] for s in (4, 5, 6)) < sum(loss[s] for s in (1, 2, 3)), loss
    if name != "adamw":  # adamw's: tests/test_checkpoint.py
        resumes_exactly(run_dir, argv)  # single (and ddp, the same files): optimizer.pt


def test_resuming_with_another_optimizer_is_a_clear_error(single_runs, cache_dir, tiny_text):
    run_dir, _, _ = single_runs("sgd")
    proc = run_cli(*gpt_args(run_dir, cache_dir, tiny_text, "lion", "train.max_steps=8"))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {run_dir / 'checkpoints' / f'step-{STEPS}'}: written with optim.name sgd; this run uses lion (its "
        f"state cannot take over another optimizer's: export the weights to start anew)")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("imgs")


@pytest.mark.parametrize("name, lr", [("adamw", 5e-3), ("sgd", 0.2), ("rmsprop", 2e-3), ("adafactor", 5e-3),
                                      ("lion", 1e-3)])
def test_each_optimizer_trains_the_resnet(image_dir, name, lr):
    ok(run_cli(*images(image_dir / name, f"optim.name={name}", f"optim.lr={lr}", "train.max_steps=8",
                       "schedule.warmup_steps=0", "schedule.decay=constant", "checkpoint.save_final=false")))
    loss = losses(image_dir / name / "run")
    assert sum(loss[s] for s in (6, 7, 8)) < sum(loss[s] for s in (1, 2, 3)) - 0.3, loss


# ZeRO-2 for every optimizer, ZeRO-3 for adafactor (non-tensor state, sub-group partitions). adamw's exact
# resume under every engine (after SIGKILL) is tests/test_matrix.py's.
MATRIX = [(engine, name) for engine in ("fsdp", "zero2") for name in OPTIMIZERS if name != "adamw"]
MATRIX += [("zero3", "adafactor")]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("engine, name", MATRIX)
def test_each_optimizer_resumes_exactly_at_two_ranks(tmp_path, cache_dir, tiny_text, single_runs, engine, name):
    run_dir = tmp_path / "run"
    argv = gpt_args(run_dir, cache_dir, tiny_text, name, *ENGINES[engine], "--nproc", "2")
    first = ok(run_cli(*argv))
    header = first.stdout.split("run gpt-test:")[1].splitlines()[0]
    assert re.search(rf"optimizer \w*{OPTIMIZERS[name][1]}\b", header), header  # fsdp: DTensorAdafactor
    assert ("unfactored" in header) == (engine.startswith("zero") and name == "adafactor"), header
    got = resumes_exactly(run_dir, argv)
    if engine == "fsdp" or name != "adafactor":  # ZeRO's Adafactor sees flat partitions: not factored
        want = losses(single_runs(name)[0])
        assert got == pytest.approx(want, abs=1e-4), (got, want)
    if (engine, name) == ("zero2", "sgd"):  # another world size: DeepSpeed's universal checkpoint is Adam's
        one = run_cli(*gpt_args(run_dir, cache_dir, tiny_text, name, *ENGINES[engine], "--nproc", "1"))
        assert one.returncode == 2, one.stdout[-2000:] + one.stderr[-2000:]
        assert one.stderr.strip().splitlines()[-1] == (
            f"error: {run_dir / 'checkpoints' / f'step-{STEPS}'}: written on 2 ranks; DeepSpeed's universal checkpoint "
            f"(for another world size) carries Adam's state only, so optim.name sgd resumes on 2 ranks")


def test_step_and_onecycle_schedules():
    step = ScheduleSection(warmup_steps=2, decay="step", step_size=3, gamma=0.5)
    assert [lr_at(s, 20, 1.0, step) for s in range(11)] == [0.5, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
    # onecycle: round(0.2 x 25) = 5 steps from lr / 10 up to lr, then cosine to lr / 100 at step 25
    one = ScheduleSection(decay="onecycle", pct_start=0.2, div_factor=10, final_div_factor=100)
    assert lr_at(0, 25, 1.0, one) == pytest.approx(0.1)
    assert lr_at(2, 25, 1.0, one) == pytest.approx(0.1 + 0.9 * 2 / 5)
    assert lr_at(5, 25, 1.0, one) == pytest.approx(1.0)
    assert lr_at(15, 25, 1.0, one) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_at(25, 25, 1.0, one) == pytest.approx(0.01)
    # without pct_start the warmup is schedule.warmup_steps
    assert lr_at(4, 25, 1.0, one.model_copy(update={"pct_start": None, "warmup_steps": 8})) == pytest.approx(0.55)
    assert lr_at(4, 25, 1.0, ScheduleSection(warmup_steps=8)) == pytest.approx(5 / 8)  # today's warmup, unchanged


@pytest.mark.parametrize("overrides, message", [
    (["optim.momentum=0.9"], "optim.momentum: only for sgd and rmsprop (optim.name is adamw)"),
    (["optim.name=sgd", "optim.beta2=0.99"], "optim.beta2: only for adamw and lion (optim.name is sgd)"),
    (["optim.name=sgd", "strategy.name=deepspeed", "strategy.deepspeed.offload_optimizer=true"],
     "strategy.deepspeed.offload_optimizer: ZeRO-Offload steps DeepSpeed's CPU Adam, so only optim.name adamw can "
     "offload (optim.name is sgd)"),
])
def test_cli_rejects_keys_that_do_not_apply(tmp_path, overrides, message):
    proc = run_cli("train", str(ROOT / "configs" / "gpt-tiny.yaml"), f"run.dir={tmp_path / 'run'}", *overrides)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {message}"
    assert not (tmp_path / "run").exists()
