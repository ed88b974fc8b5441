"""``bigtrain report``: plots and report.md from real runs, a sweep's leaderboard, bad input."""

import json

import numpy as np
import pytest

from conftest import read_jsonl, run_cli, train_args

LRS = {"fast": "3e-3", "slow": "1e-3"}  # run dir name -> optim.lr
PLOTS = ["loss_step.png", "loss_tokens.png", "lr.png", "throughput.png", "mfu.png", "memory.png"]
TAB_BLUE, TAB_ORANGE = (31, 119, 180), (255, 127, 14)  # the first two runs' colours


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, cache_dir, tiny_text):
    """Two real 8-step runs that differ in optim.lr only, evaluated at steps 4 and 8."""
    root = tmp_path_factory.mktemp("report-runs")
    for name, lr in LRS.items():
        proc = run_cli(*train_args(root / name, cache_dir, tiny_text, "train.max_steps=8", "train.eval_every=4",
                                   f"optim.lr={lr}", "train.sample_tokens=0", "checkpoint.save_final=false"))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return root


def pixels_of(image: np.ndarray, rgb: tuple[int, int, int]) -> int:
    return int((np.abs(image[..., :3] * 255 - np.array(rgb)).max(axis=-1) < 12).sum())


def test_report_overlays_runs_and_names_the_config_difference(two_runs, tmp_path):
    from matplotlib.image import imread

    out = tmp_path / "out"
    proc = run_cli("report", str(two_runs / "fast"), str(two_runs / "slow"), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"report: {out / 'report.md'}" in proc.stdout
    shown = json.loads((out / "plots.json").read_text())
    assert sorted(shown) == sorted(PLOTS)
    for name in PLOTS:
        image = imread(out / name)
        assert image.shape[0] > 300 and image.shape[1] > 500, (name, image.shape)
        assert pixels_of(image, TAB_BLUE) > 50 and pixels_of(image, TAB_ORANGE) > 50, name  # both runs drawn
        plot = shown[name]
        assert plot["legend"] == ["fast", "slow"], (name, plot)  # read off the figure's legend
        assert plot["xlabel"] and plot["ylabel"] and plot["title"], (name, plot)
    assert shown["loss_tokens.png"]["xlabel"] == "tokens seen"
    assert shown["throughput.png"]["ylabel"] == "tokens/s"

    md = (out / "report.md").read_text()
    diff_rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert diff_rows == ["| `optim.lr` | 0.003 | 0.001 |"], md  # the only difference (run.dir/name aside)
    for name in LRS:
        evals = read_jsonl(two_runs / name / "eval.jsonl")
        assert [e["step"] for e in evals] == [4, 8]
        best = min(evals, key=lambda e: e["val_loss"])
        metrics = read_jsonl(two_runs / name / "metrics.jsonl")
        assert f"| {name} | {metrics[-1]['loss']:.4f} | {evals[-1]['val_loss']:.4f} | {best['val_loss']:.4f} " \
               f"(step {best['step']}) | {evals[-1]['val_ppl']:.2f} |" in md, md
        tps = sorted(m["tokens_per_s"] for m in metrics)
        assert f"| {name} | {(tps[3] + tps[4]) / 2:,.1f} | " in md  # the median over 8 steps


def test_report_of_one_run_goes_into_its_run_dir(two_runs):
    proc = run_cli("report", str(two_runs / "slow"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    md = (two_runs / "slow" / "report" / "report.md").read_text()
    assert "| slow |" in md and "Config differences" not in md
    assert json.loads((two_runs / "slow" / "report" / "plots.json").read_text())["lr.png"]["legend"] == ["slow"]


def write_trial(task_dir, lr, val_loss=None, n_layer=2):
    """A sweep task's files, small and made up: 4 logged steps, one evaluation."""
    task_dir.mkdir(parents=True)
    (task_dir / "config.yaml").write_text(f"run:\n  name: sw-{task_dir.name}\n  dir: {task_dir}\n"
                                          f"model:\n  n_layer: {n_layer}\noptim:\n  lr: {lr}\n")
    if val_loss is None:
        return
    (task_dir / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "loss": 6.0 - s / 10, "lr": lr, "tokens_per_s": 100.0 * s, "tokens_seen": 512 * s,
         "samples_per_s": 1.0, "samples_seen": 8 * s, "mfu": 0.01, "mem_peak_rss_bytes": 2**29}) + "\n"
        for s in range(1, 5)))
    (task_dir / "eval.jsonl").write_text(json.dumps({"step": 4, "val_loss": val_loss}) + "\n")


@pytest.mark.parametrize("with_sweep_json", [False, True])
def test_sweep_report_ranks_trials_and_plots_the_metric_against_each_swept_key(tmp_path, with_sweep_json):
    sweep = tmp_path / "sw"
    trials = [(1e-4, 5.0, 2), (1e-2, 4.0, 4), (1e-3, 4.5, 2), (3e-3, None, 4)]  # lr, final val_loss, n_layer
    for i, (lr, val_loss, n_layer) in enumerate(trials):
        write_trial(sweep / f"sweep-{i}", lr, val_loss, n_layer)
    if with_sweep_json:  # what `bigtrain submit --sweep` writes: the swept keys and settings
        (sweep / "sweep.json").write_text(json.dumps({"keys": ["optim.lr"], "tasks": [
            {"index": i, "setting": {"optim.lr": lr}, "run_dir": str(sweep / f"sweep-{i}")}
            for i, (lr, _, _) in enumerate(trials)]}))
    proc = run_cli("report", str(sweep))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    md = (sweep / "report" / "report.md").read_text()
    board = md[md.index("## Sweep"):].splitlines()
    ranks = [line.split(" | ")[1] for line in board if line.startswith("| ") and line[2].isdigit()]
    assert ranks == ["sweep-1", "sweep-2", "sweep-0", "sweep-3"]  # best final val_loss first; no metrics last
    assert "3/4 trial(s) have metrics" in md and "no metrics yet" in md
    keys = ["optim.lr"] if with_sweep_json else ["model.n_layer", "optim.lr"]
    assert f"Swept: {', '.join(f'`{k}`' for k in keys)}." in md
    shown = json.loads((sweep / "report" / "plots.json").read_text())
    lr_plot = shown["sweep_optim.lr.png"]
    assert lr_plot["xscale"] == "log" and lr_plot["points"] == 3 and lr_plot["xlabel"] == "optim.lr"
    assert lr_plot["ylabel"] == "final val_loss"
    if not with_sweep_json:
        assert shown["sweep_model.n_layer.png"]["xscale"] == "linear"  # not learning-rate-like
    legend = shown["loss_step.png"]["legend"]  # the trials with metrics, named with their settings
    assert [entry.split(" ")[0] for entry in legend] == ["sweep-0", "sweep-1", "sweep-2"]
    assert "optim.lr=0.01" in legend[1]


def test_report_bad_input_is_one_line_and_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    write_trial(tmp_path / "a", 1e-3, 4.0)
    write_trial(tmp_path / "b", 1e-3, 4.0)
    for args, expected in [([str(tmp_path / "missing")], f"error: {tmp_path / 'missing'}: no such directory"),
                           ([str(empty)], f"error: {empty}: no metrics.jsonl"),
                           ([str(tmp_path / "a"), str(tmp_path / "b")], "error: --out DIR")]:
        proc = run_cli("report", *args)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.startswith(expected) and proc.stderr.count("\n") == 1, proc.stderr


def test_runs_with_the_same_curve_both_stay_visible(tmp_path):
    """Two runs with equal memory (or the same schedule) draw one curve; the earlier run's is wider, so its
    colour still shows around the later one's instead of vanishing under it."""
    from matplotlib.image import imread

    from launcher.report.plots import Plotter

    xs, ys = list(range(1, 9)), [0.5] * 8
    lines = [{"label": "a", "xs": xs, "ys": ys, "color": "tab:blue"},
             {"label": "b", "xs": xs, "ys": ys, "color": "tab:orange"}]
    Plotter(tmp_path).plot("same.png", "same", "step", "GiB", lines)
    image = imread(tmp_path / "same.png")
    # a curve ~600 px long: well over the legend's 30-odd px of each colour
    assert pixels_of(image, TAB_BLUE) > 600 and pixels_of(image, TAB_ORANGE) > 600
