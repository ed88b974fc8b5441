"""Config: includes, dotted overrides, validation errors (one line, naming the key)."""

from pathlib import Path

import pytest

from bigtrain.config import ConfigError, load_config
from conftest import ROOT, run_cli


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_recipe_loads_with_defaults_and_name_from_file():
    cfg = load_config(ROOT / "configs" / "gpt-tiny.yaml")
    assert cfg.run.name == "gpt-tiny"
    assert cfg.model.d_model == 256 and cfg.model.n_layer == 4
    assert cfg.precision == "fp32"  # from base.yaml
    assert load_config(ROOT / "configs" / "gpt2-small.yaml").precision == "bf16"  # a GPU recipe
    assert cfg.schedule.warmup_steps == 20  # from base.yaml
    assert cfg.run_dir == Path("runs/gpt-tiny")


def test_include_order_and_overrides(tmp_path):
    write(tmp_path / "a.yaml", "optim: {lr: 0.1, weight_decay: 0.5}\ntrain: {max_steps: 7}\n")
    write(tmp_path / "b.yaml", "defaults: [a.yaml]\noptim: {lr: 0.2}\n")
    cfg_path = write(tmp_path / "c.yaml", "defaults: [b.yaml]\nrun: {name: c}\n")
    cfg = load_config(cfg_path, ["optim.lr=3e-4", "train.max_steps=200", "strategy.deepspeed.stage=3"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.optim.weight_decay == 0.5  # from a.yaml, untouched by b.yaml
    assert cfg.train.max_steps == 200
    assert cfg.strategy.deepspeed.stage == 3


@pytest.mark.parametrize("override, expected", [
    (["optim.lrr=1"], "optim.lrr: unknown config key"),
    (["optim.lr=abc"], "optim.lr: input should be a valid number"),
    (["train.max_steps=0"], "train.max_steps: input should be greater than or equal to 1"),
    (["precision=fp8"], "precision: input should be 'fp32', 'bf16' or 'fp16'"),
    (["strategy.name=horovod"], "strategy.name: input should be"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"],
     "train.global_batch_size (10) must be a multiple of train.micro_batch_size (4)"),
    (["model.d_model=100", "model.n_head=3"], "model.d_model (100) must be divisible by model.n_head (3)"),
    (["nonsense"], "override 'nonsense': expected KEY=VALUE"),
    (["optim.lr.x=1"], "override 'optim.lr.x=1': optim.lr is not a section"),
    (["data.val_path=dev.tsv"], "data.val_path: only for sequence_classification and sft (task 'causal_lm'"),
    (["task=sequence_classification", "model.name=bert", "data.download=shakespeare"],
     "data: sequence_classification reads data.path (and data.val_path), not data.sources or data.download"),
    (["task=sequence_classification"],
     "model.name: 'gpt2' cannot train task 'sequence_classification' (expected bert)"),
    (["optim.name=adafactor", "optim.eps=1e-6"], "optim.eps: only for adamw and rmsprop (optim.name is adafactor)"),
    (["optim.name=lion", "optim.implementation=foreach"],
     "optim.implementation: only for adamw, sgd and rmsprop (optim.name is lion)"),
    (["optim.name=rmsprop", "optim.implementation=fused"],
     "optim.implementation: fused is only for adamw and sgd (optim.name is rmsprop)"),
    (["optim.name=sgd", "optim.momentum=0", "optim.nesterov=true"], "optim.nesterov: needs optim.momentum > 0"),
    (["schedule.decay=step"], "schedule.step_size: required for schedule.decay step"),
    (["schedule.decay=onecycle", "schedule.gamma=0.5"], "schedule.gamma: only for step (schedule.decay is onecycle)"),
    (["schedule.decay=step", "schedule.step_size=10", "schedule.min_lr_ratio=0"],
     "schedule.min_lr_ratio: only for cosine and linear (schedule.decay is step)"),
])
def test_validation_errors_name_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "gpt-tiny.yaml", override)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = write(tmp_path / "bad.yaml", "optim: {lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(bad)
    loop = write(tmp_path / "loop.yaml", "defaults: [loop.yaml]\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(loop)


def test_world_size_must_divide_global_batch():
    cfg = load_config(ROOT / "configs" / "gpt-tiny.yaml", ["train.global_batch_size=16", "train.micro_batch_size=4"])
    cfg.check_world_size(2)
    assert cfg.grad_accum_steps(2) == 2
    with pytest.raises(ConfigError, match=r"multiple of train.micro_batch_size x world size \(4 x 3\)"):
        cfg.check_world_size(3)


def test_cli_bad_config_is_one_line_nonzero_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("train", "configs/gpt-tiny.yaml", "optim.lr=-1", f"run.dir={run_dir}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: optim.lr: input should be greater than 0 (got -1)"
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_cli_world_size_check_before_any_process(tmp_path):
    proc = run_cli("train", "configs/gpt-tiny.yaml", "--nproc", "3", "strategy.name=ddp", f"run.dir={tmp_path}/r")
    assert proc.returncode == 2
    expected = "train.global_batch_size (16) must be a multiple of train.micro_batch_size x world size (8 x 3)"
    assert expected in proc.stderr


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "gpt-tiny.yaml", ["checkpoint.async=true"])
    saved = write(tmp_path / "resolved.yaml", cfg.to_yaml())
    again = load_config(saved)
    assert again == cfg
    assert again.checkpoint.async_ is True


def test_resolved_config_keeps_only_the_keys_that_apply(tmp_path):
    cfg = load_config(ROOT / "configs" / "gpt-tiny.yaml", ["optim.name=adafactor", "schedule.decay=onecycle"])
    tree = cfg.to_dict()
    assert tree["optim"] == {"name": "adafactor", "lr": cfg.optim.lr, "weight_decay": 0.1, "decay_rate": -0.8,
                             "clip_threshold": 1.0}  # adafactor's momentum (beta1) only where set
    assert set(tree["schedule"]) == {"warmup_steps", "decay", "pct_start", "div_factor", "final_div_factor"}
    again = load_config(write(tmp_path / "resolved.yaml", cfg.to_yaml()))
    assert again == cfg and again.optim.adafactor_beta1 is None
    momentum = load_config(ROOT / "configs" / "gpt-tiny.yaml", ["optim.name=adafactor", "optim.beta1=0.8"])
    assert load_config(write(tmp_path / "m.yaml", momentum.to_yaml())).optim.adafactor_beta1 == 0.8
    assert set(load_config(ROOT / "configs" / "gpt-tiny.yaml").to_dict()["optim"]) == {
        "name", "lr", "weight_decay", "beta1", "beta2", "eps", "implementation"}  # adamw: as before


# ---------------------------------------------------------------------------------------------
# bigtrain config: the resolved config, and --explain KEY
# ---------------------------------------------------------------------------------------------


def test_cli_explain_prints_type_default_and_description():
    proc = run_cli("config", "--explain", "checkpoint.async")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ("checkpoint.async: bool = false\n"
                           "    Write while training continues (one write in flight).\n")


def test_cli_explain_a_section_lists_its_keys_with_ranges():
    from bigtrain.config import ResourcesSection

    proc = run_cli("config", "--explain", "resources")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "resources: section"
    assert "resources.signal_grace_s: int = 120  (>= 0, <= 65535)" in lines
    assert "resources.accelerator: auto | gpu | cpu = auto" in lines
    heads = [line.split(":")[0] for line in lines if not line.startswith(" ")]
    assert heads == ["resources", *(f"resources.{name}" for name in ResourcesSection.model_fields)]


def test_cli_explain_unknown_key_is_one_line_exit_2():
    proc = run_cli("config", "--explain", "checkpoint.asink")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: checkpoint.asink: unknown config key (did you mean checkpoint.async?)"
    assert proc.stdout == ""


def test_every_config_key_has_a_description():
    from bigtrain.config.explain import describe, find, keys

    undocumented = [k.path for k in keys() if len(describe(k).splitlines()) < 2]
    assert undocumented == []
    assert [k.path for k in find("data.sources.weight")] == ["data.sources[].weight"]
    assert find("train.sample_prompt")[0].path == "train.sample_prompt"
    assert describe(find("train.sample_prompt")[0]).splitlines()[0] == 'train.sample_prompt: str = "\\n"'


def test_cli_config_prints_the_resolved_yaml(tmp_path):
    import yaml

    proc = run_cli("config", "configs/gpt-tiny.yaml", "optim.lr=3e-4", "checkpoint.async=true")
    assert proc.returncode == 0, proc.stderr
    expected = load_config(ROOT / "configs" / "gpt-tiny.yaml", ["optim.lr=3e-4", "checkpoint.async=true"])
    assert yaml.safe_load(proc.stdout) == expected.to_dict()
    again = load_config(write(tmp_path / "resolved.yaml", proc.stdout))
    assert again == expected
    bad = run_cli("config", "configs/gpt-tiny.yaml", "optim.lr=-1")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: optim.lr: input should be greater than 0 (got -1)"


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if p.name != "base.yaml"))
def test_every_recipe_validates(recipe):
    cfg = load_config(ROOT / "configs" / recipe, [])
    assert cfg.run.name == recipe.removesuffix(".yaml")
