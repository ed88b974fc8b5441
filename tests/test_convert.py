"""Switching engines mid-run (bigtrain/convert): ``bigtrain convert`` and the transparent
conversion on resume, on real ranks through the CLI (gloo, fp32).

Each switch resumes from step 4 of a 14-step run and must follow, for the 10 steps after it, the
losses of the run that continued on its original engine (to 1e-5); the converted checkpoint
verifies like any other, exports to bit-identical Hugging Face weights, and a checkpoint that
cannot be mapped is a one-line error (exit 2) that leaves the source untouched."""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from bigtrain.checkpoint import verify, write_manifest
from bigtrain.data.shards import sha256_file
from conftest import ENGINES, run_cli, train_args
from test_checkpoint import losses, ok

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS, SWITCH = 14, 4


def run_args(run_dir, cache_dir, tiny_text, engine, *extra, nproc=2):
    """14 steps, checkpoints every 4 (and at the end), no evaluation."""
    return train_args(run_dir, cache_dir, tiny_text, f"train.max_steps={STEPS}", "train.sample_tokens=0",
                      "checkpoint.every_steps=4", "checkpoint.keep_last=10", *ENGINES.get(engine, []),
                      "--nproc", str(nproc), *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir, tiny_text):
    """``reference(engine)`` -> the run directory of the engine's uninterrupted 2-rank run."""
    @functools.cache
    def get(engine):
        run_dir = tmp_path_factory.mktemp(f"convert-{engine}") / "run"
        ok(run_cli(*run_args(run_dir, cache_dir, tiny_text, engine)))
        return run_dir

    return get


def checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def switched_copy(reference_dir: Path, tmp_path: Path) -> Path:
    """The reference run directory as it was at step 4 (its later checkpoints removed)."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_dir, run_dir)
    for ckpt in (run_dir / "checkpoints").iterdir():
        if ckpt.name != f"step-{SWITCH}":
            shutil.rmtree(ckpt)
    return run_dir


def assert_follows(reference_dir: Path, run_dir: Path) -> None:
    ref, got = losses(reference_dir), losses(run_dir)
    after = [s for s in sorted(got) if s > SWITCH]
    assert after == list(range(SWITCH + 1, STEPS + 1)), after  # 10 steps after the switch
    for step in after:
        assert got[step] == pytest.approx(ref[step], abs=1e-5), (step, got[step], ref[step])


def test_zero3_to_fsdp_on_resume_at_two_ranks(tmp_path, reference, cache_dir, tiny_text):
    """strategy.name=fsdp on a ZeRO-3 run directory: converted beside the checkpoint, then resumed."""
    run_dir = switched_copy(reference("zero3"), tmp_path)
    source = run_dir / "checkpoints" / f"step-{SWITCH}"
    before = checksums(source)
    proc = ok(run_cli(*run_args(run_dir, cache_dir, tiny_text, "fsdp")))
    assert f"converting step-{SWITCH} from zero3 to fsdp" in proc.stdout, proc.stdout[-2000:]
    assert_follows(reference("zero3"), run_dir)
    converted = source.parent / f".step-{SWITCH}.fsdp"
    manifest = verify(converted)  # checksums, as any checkpoint
    assert manifest["strategy"] == "fsdp" and manifest["converted_from"]["stage"] == 3
    assert checksums(source) == before


def test_zero3_to_fsdp_at_one_rank_with_bigtrain_convert(tmp_path, reference, cache_dir, tiny_text):
    """bigtrain convert --world-size 1, then resume on 1 rank; the export is bit-identical."""
    ref = reference("zero3")
    out = tmp_path / "converted"
    proc = run_cli("convert", str(ref), "--step", str(SWITCH), "--to", "fsdp", "--world-size", "1", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ckpt = out / "checkpoints" / f"step-{SWITCH}"
    assert verify(ckpt)["world_size"] == 1
    assert not list(ckpt.glob("rng-*.json"))  # RNG states belong to the 2 ranks that wrote them
    ok(run_cli(*run_args(out, cache_dir, tiny_text, "fsdp", nproc=1)))
    assert_follows(ref, out)
    assert_same_export(ref, out, tmp_path)


def assert_same_export(original: Path, converted: Path, tmp_path: Path) -> None:
    """``bigtrain export`` of the converted checkpoint == of the original, byte for byte."""
    exported = {}
    for name, run_dir in (("original", original), ("converted", converted)):
        target = tmp_path / f"hf-{name}"
        ok(run_cli("export", str(run_dir), "--step", str(SWITCH), "--to", "hf", str(target)))
        exported[name] = (target / "model.safetensors").read_bytes()
    assert exported["original"] == exported["converted"]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_fsdp_to_zero_on_resume_at_two_ranks(tmp_path, reference, cache_dir, tiny_text, zero):
    """One universal checkpoint serves ZeRO-1/2's loader and ZeRO-3's."""
    run_dir = switched_copy(reference("fsdp"), tmp_path)
    proc = ok(run_cli(*run_args(run_dir, cache_dir, tiny_text, zero)))
    assert f"converting step-{SWITCH} from fsdp to {zero}" in proc.stdout, proc.stdout[-2000:]
    assert_follows(reference("fsdp"), run_dir)
    converted = run_dir / "checkpoints" / f".step-{SWITCH}.{zero}"
    verify(converted)
    if zero == "zero3":
        return
    # the converted checkpoint as a run directory of its own, exported
    exported = tmp_path / "converted-run" / "checkpoints"
    exported.mkdir(parents=True)
    shutil.copytree(converted, exported / f"step-{SWITCH}")
    assert_same_export(reference("fsdp"), exported.parent, tmp_path)


def test_zero3_to_ddp_on_resume_at_two_ranks(tmp_path, reference, cache_dir, tiny_text):
    """To single/ddp's files. (ZeRO-3 keeps one Adam step tensor for all its parameters: carried
    shared into optimizer.pt, torch's Adam advanced it once per parameter and the losses drifted.)"""
    run_dir = switched_copy(reference("zero3"), tmp_path)
    proc = ok(run_cli(*run_args(run_dir, cache_dir, tiny_text, "ddp")))
    assert f"converting step-{SWITCH} from zero3 to ddp" in proc.stdout, proc.stdout[-2000:]
    assert_follows(reference("zero3"), run_dir)
    state = torch.load(run_dir / "checkpoints" / f".step-{SWITCH}.ddp" / "optimizer.pt", weights_only=True)
    steps = [s["step"] for s in state["optimizer"]["state"].values()]
    assert len({s.untyped_storage().data_ptr() for s in steps}) == len(steps)


def test_every_engine_round_trip_is_bit_identical(tmp_path, reference):
    """ZeRO-3 -> fsdp -> ZeRO-2 -> single -> ZeRO-1 -> ddp -> ZeRO-3, offline: every tensor of the
    full state (fp32 weights, step, exp_avg, exp_avg_sq) and the groups come back exactly."""
    from bigtrain.convert import convert_checkpoint
    from bigtrain.convert.readers import read_state
    from bigtrain.convert.state import model_layout

    def full_state(ckpt: Path):
        with tempfile.TemporaryDirectory() as scratch:
            return read_state(json.loads((ckpt / "manifest.json").read_text())["strategy"], ckpt,
                              model_layout(ckpt), Path(scratch))

    src = reference("zero3") / "checkpoints" / f"step-{SWITCH}"
    first = full_state(src)
    chain = [("fsdp", None), ("deepspeed", 2), ("single", None), ("deepspeed", 1), ("ddp", None), ("deepspeed", 3)]
    for i, target in enumerate(chain):
        out = tmp_path / f"{i}-{target[0]}{target[1] or ''}"
        convert_checkpoint(src, out, target, world_size=1 if target[0] == "single" else None, log=lambda _: None)
        verify(out)
        src = out
    last = full_state(src)
    assert sorted(last.weights) == sorted(first.weights)
    for name, weight in first.weights.items():
        assert torch.equal(last.weights[name], weight), name
        for key, value in first.optim[name].items():
            assert torch.equal(last.optim[name][key], value), (name, key)
    assert [g["params"] for g in last.groups] == [g["params"] for g in first.groups]
    assert [g["weight_decay"] for g in last.groups] == [g["weight_decay"] for g in first.groups]


def one_process_run(tmp_path, cache_dir, tiny_text, *extra) -> Path:
    run_dir = tmp_path / "run"
    ok(run_cli(*train_args(run_dir, cache_dir, tiny_text, "train.max_steps=4", "train.sample_tokens=0",
                           "checkpoint.every_steps=4", "strategy.name=single", *extra)))
    return run_dir


def test_another_optimizer_is_a_one_line_error_and_the_source_is_untouched(tmp_path, cache_dir, tiny_text):
    run_dir = one_process_run(tmp_path, cache_dir, tiny_text, "optim.name=sgd")
    before = checksums(run_dir / "checkpoints")
    proc = run_cli("convert", str(run_dir), "--to", "fsdp", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "optim.name sgd" in errors[0] and "AdamW" in errors[0], proc.stderr
    assert checksums(run_dir / "checkpoints") == before
    assert not (tmp_path / "out" / "checkpoints" / "step-4").exists()


def test_a_missing_optimizer_state_is_named_on_convert_and_on_resume(tmp_path, cache_dir, tiny_text):
    """A (valid, verifying) checkpoint lacking one parameter's Adam state cannot become a sharded
    engine's: both bigtrain convert and a resume under another engine say which parameter."""
    run_dir = one_process_run(tmp_path, cache_dir, tiny_text)
    ckpt = run_dir / "checkpoints" / "step-4"
    blob = torch.load(ckpt / "optimizer.pt", weights_only=True)
    del blob["optimizer"]["state"][3]
    torch.save(blob, ckpt / "optimizer.pt")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    write_manifest(ckpt, 4, manifest["world_size"], manifest["strategy"])
    verify(ckpt)
    before = checksums(run_dir / "checkpoints")
    proc = run_cli("convert", str(run_dir), "--to", "deepspeed", "--stage", "3", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no optimizer state for parameter transformer.h.0.attn.c_proj.weight" in errors[0], \
        proc.stderr
    resume = run_cli(*train_args(run_dir, cache_dir, tiny_text, "train.max_steps=6", "train.sample_tokens=0",
                                 "strategy.name=fsdp", "--nproc", "1"))
    assert resume.returncode == 2, resume.stdout[-2000:] + resume.stderr[-2000:]
    assert "no optimizer state for parameter transformer.h.0.attn.c_proj.weight" in resume.stdout + resume.stderr
    assert checksums(run_dir / "checkpoints") == before
