"""``bigtrain report RUN_DIR [RUN_DIR ...] [--out DIR]``: PNG plots of runs, overlaid, and a
Markdown summary (``report.md``) beside them; a sweep directory (``sweep-<i>/`` task dirs) adds a
leaderboard and its metric against each swept parameter. ``plots.json`` records what each plot
shows (title, axis labels, legend). Reads ``metrics.jsonl``, ``eval.jsonl`` and ``config.yaml``;
matplotlib (Agg), no torch: runs on login nodes.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.sweep import SWEEP_FILE, read_jsonl

IGNORED_KEYS = ("run.dir", "run.name")  # differ between any two runs; the runs table names them
MAX_POINTS = 5000  # per plotted line: longer series are thinned (statistics use every record)
_TASK_DIR = re.compile(r"^sweep-(\d+)$")
_ABSENT = object()


class ReportError(Exception):
    """Bad input: one line for the user."""


@dataclass
class Run:
    path: Path
    metrics: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    config: dict[str, Any]  # flattened: dotted keys
    label: str = ""


@dataclass
class Trial:
    index: int
    setting: dict[str, Any]
    path: Path
    run: Run | None  # None: no metrics.jsonl yet


@dataclass
class Sweep:
    path: Path
    keys: list[str]
    trials: list[Trial] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (lists stay values)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _by_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step (the last one written), in step order."""
    steps = {r["step"]: r for r in records if isinstance(r.get("step"), int)}
    return [steps[s] for s in sorted(steps)]


def read_config(path: Path) -> dict[str, Any]:
    """``path/config.yaml`` flattened; {} without one."""
    if not (path / "config.yaml").is_file():
        return {}
    try:
        return flatten(yaml.safe_load((path / "config.yaml").read_text()) or {})
    except (yaml.YAMLError, AttributeError) as err:
        raise ReportError(f"{path / 'config.yaml'}: not a config ({' '.join(str(err).split())})") from None


def load_run(path: Path) -> Run:
    if not path.is_dir():
        raise ReportError(f"{path}: no such directory")
    if not (path / "metrics.jsonl").is_file():
        raise ReportError(f"{path}: no metrics.jsonl (not a run directory, or its run has not logged a step yet)")
    run = Run(path, _by_step(read_jsonl(path / "metrics.jsonl")), _by_step(read_jsonl(path / "eval.jsonl")),
              read_config(path))
    if not run.metrics:
        raise ReportError(f"{path / 'metrics.jsonl'}: no records")
    return run


def _task_dirs(path: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in path.iterdir() if p.is_dir() and (m := _TASK_DIR.match(p.name))}


def is_sweep(path: Path) -> bool:
    return (path.is_dir() and not (path / "metrics.jsonl").is_file()
            and ((path / SWEEP_FILE).is_file() or bool(_task_dirs(path))))


def load_sweep(path: Path) -> Sweep:
    """The trials of ``path`` (``sweep.json`` when there, else its ``sweep-<i>/`` dirs, with the
    swept keys read off their configs)."""
    dirs = _task_dirs(path)
    if (path / SWEEP_FILE).is_file():
        record = json.loads((path / SWEEP_FILE).read_text())
        sweep = Sweep(path, list(record["keys"]))
        for task in record["tasks"]:
            i = task["index"]
            task_dir = dirs.get(i) or Path(task["run_dir"])  # a moved sweep keeps its sweep-<i>/ dirs
            sweep.trials.append(Trial(i, dict(task["setting"]), task_dir, _maybe_run(task_dir)))
    else:
        trials = [Trial(i, {}, d, _maybe_run(d)) for i, d in sorted(dirs.items())]
        configs = [t.run.config if t.run else read_config(t.path) for t in trials]
        keys = [k for k, _ in config_differences([Run(t.path, [], [], c) for t, c in zip(trials, configs) if c])]
        for t, config in zip(trials, configs):
            t.setting = {k: config[k] for k in keys if k in config}
        sweep = Sweep(path, keys, trials)
    if not any(t.run for t in sweep.trials):
        raise ReportError(f"{path}: none of its {len(sweep.trials)} sweep task(s) has a metrics.jsonl yet")
    return sweep


def _maybe_run(path: Path) -> Run | None:
    return load_run(path) if (path / "metrics.jsonl").is_file() else None


def _labels(paths: Sequence[Path]) -> list[str]:
    """The shortest path suffixes that tell the runs apart (``a``, ``b``; ``x/run``, ``y/run``)."""
    parts = [p.resolve().parts for p in paths]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def load(paths: Sequence[Path]) -> tuple[list[Run], list[Sweep]]:
    """Every run named (a sweep's trials with metrics among them), labelled, and the sweeps."""
    runs, sweeps, seen = [], [], set()
    for path in paths:
        if not path.is_dir():
            raise ReportError(f"{path}: no such directory")
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        if is_sweep(path):
            sweeps.append(load_sweep(path))
            runs += [t.run for t in sweeps[-1].trials if t.run]
        else:
            runs.append(load_run(path))
    for run, label in zip(runs, _labels([r.path for r in runs])):
        run.label = label
    for sweep in sweeps:
        for t in sweep.trials:
            if t.run and t.setting:
                t.run.label += " (" + ", ".join(f"{k}={_fmt(v)}" for k, v in t.setting.items()) + ")"
    return runs, sweeps


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------


def config_differences(runs: Sequence[Run]) -> list[tuple[str, list[Any]]]:
    """``(key, [each run's value])`` for the flattened keys whose values differ (``run.dir`` and
    ``run.name`` aside); a key a run lacks has the value ``_ABSENT`` there."""
    if len(runs) < 2:
        return []
    keys = sorted(set().union(*(r.config for r in runs)) - set(IGNORED_KEYS))
    out = []
    for key in keys:
        values = [r.config.get(key, _ABSENT) for r in runs]
        if len({json.dumps(v, sort_keys=True, default=repr) if v is not _ABSENT else "\0absent" for v in values}) > 1:
            out.append((key, values))
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _values(records: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in records if _finite(r.get(key))]


def rate_key(runs: Sequence[Run]) -> str:
    """tokens_per_s when every run has it (text tasks), else samples_per_s."""
    return "tokens_per_s" if all(_values(r.metrics, "tokens_per_s") for r in runs) else "samples_per_s"


def seen_key(runs: Sequence[Run]) -> str:
    return "tokens_seen" if all(_values(r.metrics, "tokens_seen") for r in runs) else "samples_seen"


def summary(run: Run, rate: str = "tokens_per_s") -> dict[str, Any]:
    """Final and best metrics, median throughput and MFU, peak memory of one run."""
    last = run.metrics[-1]
    out: dict[str, Any] = {"step": last["step"], "loss": last.get("loss"), "tokens_seen": last.get("tokens_seen"),
                           "samples_seen": last.get("samples_seen")}
    for key, best in (("val_loss", min), ("val_ppl", min), ("val_accuracy", max)):
        evals = [e for e in run.evals if _finite(e.get(key))]
        if evals:
            top = best(evals, key=lambda e: e[key])
            out[key], out[f"best_{key}"], out[f"best_{key}_step"] = evals[-1][key], top[key], top["step"]
    for key in (rate, "mfu"):
        values = _values(run.metrics, key)
        out[f"median_{key}"] = statistics.median(values) if values else None
    peaks = [v for r in run.metrics for k, v in r.items() if k.startswith("mem_peak") and _finite(v)]
    out["peak_memory_bytes"] = max(peaks) if peaks else None
    return out


def final_metric(runs: Sequence[Run]) -> str:
    """What a sweep ranks by: final val_loss when any trial has one, else final train loss."""
    return "val_loss" if any(_values(r.evals, "val_loss") for r in runs) else "loss"


def leaderboard(sweep: Sweep) -> tuple[str, str, list[tuple[Trial, dict[str, Any] | None]]]:
    """The metric ranked by, the throughput key, and the trials with their summaries, best first
    by final val_loss (trials without it last)."""
    runs = [t.run for t in sweep.trials if t.run]
    metric, rate = final_metric(runs), rate_key(runs)
    rows = [(t, summary(t.run, rate) if t.run else None) for t in sweep.trials]
    rows.sort(key=lambda row: (row[1] is None or not _finite(row[1].get(metric)),
                               row[1][metric] if row[1] and _finite(row[1].get(metric)) else 0, row[0].index))
    return metric, rate, rows


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("bigtrain report needs matplotlib: pip install matplotlib") from None
    return matplotlib, Figure, FigureCanvasAgg


def _colors(n: int) -> list[Any]:
    matplotlib, _, _ = _matplotlib()
    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(n)]
    return [matplotlib.colormaps["viridis"](i / (n - 1)) for i in range(n)]


def _thin(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    if len(xs) <= MAX_POINTS:
        return xs, ys
    stride = math.ceil(len(xs) / MAX_POINTS)
    keep = list(range(0, len(xs), stride))
    if keep[-1] != len(xs) - 1:
        keep.append(len(xs) - 1)
    return [xs[i] for i in keep], [ys[i] for i in keep]


class Plotter:
    """Writes PNGs into ``out`` and records in :attr:`shown` what each shows (for ``plots.json``)."""

    def __init__(self, out: Path):
        self.out = out
        self.shown: dict[str, dict[str, Any]] = {}

    def plot(self, name: str, title: str, xlabel: str, ylabel: str,
             lines: list[dict[str, Any]], xscale: str = "linear") -> bool:
        """``lines``: ``{label (None: not in the legend), xs, ys, color, style}``; False (and no file)
        when no line has points."""
        lines = [line for line in lines if line["xs"]]
        if not lines:
            return False
        fig, ax = self._axes()
        for line in lines:
            xs, ys = _thin(line["xs"], line["ys"])
            style = line.get("style", "-")
            ax.plot(xs, ys, style, color=line.get("color"), label=line["label"] or "_nolegend_",
                    markersize=4 if "o" in style else None, linewidth=1.4)
        self._save(fig, ax, name, title, xlabel, ylabel, xscale)
        return True

    @staticmethod
    def _axes():
        _, Figure, FigureCanvasAgg = _matplotlib()
        fig = Figure(figsize=(8, 5), dpi=100)
        FigureCanvasAgg(fig)
        return fig, fig.add_subplot()

    def _save(self, fig, ax, name: str, title: str, xlabel: str, ylabel: str, xscale: str, **extra: Any) -> None:
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xscale=xscale)
        ax.grid(alpha=0.3)
        entries = len(ax.get_legend_handles_labels()[1])
        legend = (ax.legend(fontsize="small") if entries <= 6 else  # many runs: beside the plot
                  ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0)))
        fig.savefig(self.out / name, bbox_inches="tight")
        self.shown[name] = {"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
                            "xscale": ax.get_xscale(), "legend": [t.get_text() for t in legend.get_texts()], **extra}

    def points(self, name: str, title: str, xlabel: str, ylabel: str, xs: list[Any], ys: list[float],
               notes: list[str], xscale: str = "linear", label: str = "") -> None:
        """A scatter of one value per trial, each point annotated (``notes``)."""
        fig, ax = self._axes()
        categorical = not all(_finite(x) for x in xs)
        ticks = list(dict.fromkeys(_fmt(x) for x in xs)) if categorical else []
        pos = [ticks.index(_fmt(x)) for x in xs] if categorical else xs
        ax.plot(pos, ys, "o", color="tab:blue", label=label)
        for x, y, note in zip(pos, ys, notes):
            ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
        if categorical:
            ax.set_xticks(range(len(ticks)), ticks)
        self._save(fig, ax, name, title, xlabel, ylabel, xscale, points=len(ys))


def _xy(records: list[dict[str, Any]], xkey: str, ykey: str,
        scale: float = 1.0) -> tuple[list[float], list[float]]:
    pairs = [(r[xkey], r[ykey] * scale) for r in records if _finite(r.get(xkey)) and _finite(r.get(ykey))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _per_step(run: Run, key: str) -> float | None:
    """``key`` (tokens_seen, samples_seen) per step: they grow linearly with the step."""
    with_key = [r for r in run.metrics if _finite(r.get(key)) and r["step"] > 0]
    return with_key[-1][key] / with_key[-1]["step"] if with_key else None


def run_plots(plotter: Plotter, runs: list[Run]) -> list[tuple[str, str]]:
    """Loss against step and tokens (or samples), lr, throughput, MFU, memory: ``[(file, what)]``."""
    colors = dict(zip((id(r) for r in runs), _colors(len(runs))))
    seen, rate = seen_key(runs), rate_key(runs)
    seen_name = seen.replace("_seen", "")
    made = []

    def loss_lines(xkey: str) -> list[dict[str, Any]]:
        lines = []
        for run in runs:
            color = colors[id(run)]
            xs, ys = _xy(run.metrics, xkey, "loss")
            lines.append({"label": run.label, "xs": xs, "ys": ys, "color": color})
            xs, ys = _xy(run.evals, "step", "val_loss")
            if xkey != "step":
                per_step = _per_step(run, xkey)
                xs = [x * per_step for x in xs] if per_step else []
            lines.append({"label": None, "xs": xs, "ys": ys[:len(xs)], "color": color, "style": "o--"})
        return lines

    def simple(ykey: str, scale: float = 1.0) -> list[dict[str, Any]]:
        return [{"label": run.label, "color": colors[id(run)],
                 **dict(zip(("xs", "ys"), _xy(run.metrics, "step", ykey, scale)))} for run in runs]

    specs: list[tuple[str, str, str, str, Callable[[], list[dict[str, Any]]]]] = [
        ("loss_step.png", "loss against step: train (line), val (dashed, dots)", "step", "loss",
         lambda: loss_lines("step")),
        (f"loss_{seen_name}.png", f"loss against {seen_name}: train (line), val (dashed, dots)", f"{seen_name} seen",
         "loss", lambda: loss_lines(seen)),
        ("lr.png", "learning rate", "step", "learning rate", lambda: simple("lr")),
        ("throughput.png", f"throughput ({rate.replace('_per_s', '')}/s)", "step",
         rate.replace("_per_s", "/s"), lambda: simple(rate)),
        ("mfu.png", "model FLOPs utilization", "step", "MFU (%)", lambda: simple("mfu", 100.0)),
        ("memory.png", f"memory ({', '.join(memory_keys(runs))})", "step", "GiB", lambda: memory_lines(runs, colors)),
    ]
    for name, title, xlabel, ylabel, lines in specs:
        if plotter.plot(name, title, xlabel, ylabel, lines()):
            made.append((name, title))
    return made


def _memory_keys(run: Run) -> list[str]:
    """The run's ``mem_peak_*`` keys (every ``mem_*`` key where none is a peak)."""
    keys = sorted({k for r in run.metrics for k in r if k.startswith("mem_")})
    return [k for k in keys if k.startswith("mem_peak")] or keys


def memory_keys(runs: list[Run]) -> list[str]:
    return sorted({k for run in runs for k in _memory_keys(run)})


def memory_lines(runs: list[Run], colors: dict[int, Any]) -> list[dict[str, Any]]:
    """Each run's :func:`_memory_keys`, in GiB."""
    lines = []
    for run in runs:
        keys = _memory_keys(run)
        styles = ["-", "--", ":", "-."]
        for i, key in enumerate(keys):
            xs, ys = _xy(run.metrics, "step", key, 1 / 2**30)
            label = run.label if len(keys) == 1 else f"{run.label} {key[4:]}"
            lines.append({"label": label, "xs": xs, "ys": ys, "color": colors[id(run)], "style": styles[i % 4]})
    return lines


def _lr_like(key: str) -> bool:
    last = key.rsplit(".", 1)[-1].lower()
    return last in ("lr", "learning_rate", "weight_decay") or last.endswith("_lr") or last.startswith("lr_")


def sweep_plots(plotter: Plotter, sweep: Sweep, metric: str, prefix: str) -> list[tuple[str, str]]:
    """The final ``metric`` of each trial against each swept key."""
    made = []
    for key in sweep.keys:
        finals = {t.index: summary(t.run).get(metric) for t in sweep.trials if t.run and key in t.setting}
        done = [t for t in sweep.trials if _finite(finals.get(t.index))]
        if not done:
            continue
        xs = [t.setting[key] for t in done]
        ys = [finals[t.index] for t in done]
        numeric = all(_finite(x) for x in xs)
        log = (numeric and _lr_like(key) and min(xs) > 0 and max(xs) / min(xs) > 10)
        name = f"{prefix}{re.sub(r'[^A-Za-z0-9._-]+', '_', key)}.png"
        title = f"{sweep.path.name}: final {metric} against {key}"
        plotter.points(name, title, key, f"final {metric}", xs, ys, [f"sweep-{t.index}" for t in done],
                       "log" if log else "linear", label=f"{len(done)} trials")
        made.append((name, title))
    return made


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _num(value: Any, spec: str = ".4f") -> str:
    return format(value, spec) if _finite(value) else "-"


def _bytes(value: Any) -> str:
    if not _finite(value):
        return "-"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def _table(header: list[str], rows: list[list[str]], right_from: int = 1) -> list[str]:
    cell = [[c.replace("|", "\\|") for c in row] for row in [header, *rows]]
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    return ["| " + " | ".join(cell[0]) + " |", "| " + " | ".join(align) + " |",
            *("| " + " | ".join(row) + " |" for row in cell[1:])]


def _best(s: dict[str, Any], key: str, spec: str = ".4f") -> str:
    return f"{_num(s.get(f'best_{key}'), spec)} (step {s[f'best_{key}_step']})" if f"best_{key}" in s else "-"


def markdown(runs: list[Run], sweeps: list[Sweep], plots: list[tuple[str, str]],
             sweep_sections: list[tuple[Sweep, str, list[tuple[str, str]]]]) -> str:
    rate, seen = rate_key(runs), seen_key(runs)
    stats = [summary(r, rate) for r in runs]
    lines = ["# bigtrain report", "", "## Runs", ""]
    lines += _table(["run", "directory", "steps", seen.replace("_", " ")],
                    [[r.label, f"`{r.path}`", str(s["step"]), _num(s.get(seen), ",")] for r, s in zip(runs, stats)],
                    right_from=2)
    lines += ["", "## Metrics", "", "Final values are at each run's last logged step and last evaluation.", ""]
    header, cols = ["run", "final loss", "final val_loss", "best val_loss"], []
    has_ppl = any("val_ppl" in s for s in stats)
    has_acc = any("val_accuracy" in s for s in stats)
    header += ["final val_ppl"] * has_ppl + ["final val_accuracy", "best val_accuracy"] * has_acc
    for r, s in zip(runs, stats):
        row = [r.label, _num(s.get("loss")), _num(s.get("val_loss")), _best(s, "val_loss")]
        row += [_num(s.get("val_ppl"), ".2f")] * has_ppl
        row += [_num(s.get("val_accuracy")), _best(s, "val_accuracy")] * has_acc
        cols.append(row)
    lines += _table(header, cols)
    rate_name = rate.replace("_per_s", "/s")
    lines += ["", "## Throughput", "", "Medians over the logged steps.", ""]
    lines += _table(["run", f"median {rate_name}", "median MFU", "peak memory"],
                    [[r.label, _num(s.get(f"median_{rate}"), ",.1f"),
                      f"{s['median_mfu'] * 100:.2f}%" if _finite(s.get("median_mfu")) else "-",
                      _bytes(s.get("peak_memory_bytes"))] for r, s in zip(runs, stats)])
    if len(runs) > 1:
        lines += ["", "## Config differences", ""]
        diffs = config_differences(runs)
        aside = " and ".join(f"`{k}`" for k in IGNORED_KEYS)
        if diffs:
            lines += [f"Keys of `config.yaml` whose values differ ({aside} aside):", ""]
            lines += _table(["key", *(r.label for r in runs)], [[f"`{k}`", *map(_fmt, v)] for k, v in diffs],
                            right_from=len(runs) + 1)
        else:
            lines += [f"The runs' `config.yaml` files agree ({aside} aside)."]
    for sweep, metric, made in sweep_sections:
        lines += ["", f"## Sweep `{sweep.path}`", ""]
        _, sweep_rate, rows = leaderboard(sweep)
        have = sum(1 for t in sweep.trials if t.run)
        swept = ", ".join(f"`{k}`" for k in sweep.keys) or "(no swept keys found)"
        lines += [f"Swept: {swept}. Best first by final {metric}; {have}/{len(sweep.trials)} trial(s) have "
                  f"metrics.", ""]
        table = []
        for rank, (t, s) in enumerate(rows, 1):
            values = [_fmt(t.setting.get(k, _ABSENT)) for k in sweep.keys]
            if s is None:
                table.append([str(rank), f"sweep-{t.index}", *values, "-", "-", "-", "-", "no metrics yet"])
                continue
            best = _best(s, metric) if metric != "loss" else "-"
            table.append([str(rank), f"sweep-{t.index}", *values, _num(s.get(metric)), best, _num(s.get("loss")),
                          str(s["step"]), _num(s.get(f"median_{sweep_rate}"), ",.1f")])
        lines += _table(["rank", "trial", *sweep.keys, f"final {metric}", f"best {metric}", "final loss", "steps",
                         f"median {sweep_rate.replace('_per_s', '/s')}"], table, right_from=len(sweep.keys) + 2)
        lines += [line for name, title in made for line in ("", f"![{title}]({name})")]
    if plots:
        lines += ["", "## Plots"] + [line for name, title in plots for line in ("", f"![{title}]({name})")]
    return "\n".join(lines) + "\n"


def default_out(paths: Sequence[Path]) -> Path:
    if len(paths) != 1:
        raise ReportError("--out DIR: several run directories need an output directory")
    return paths[0] / "report"


def write_report(paths: Sequence[Path], out: Path | None = None) -> tuple[Path, list[str]]:
    """Write the plots, ``plots.json`` and ``report.md`` into ``out``; returns (out, file names)."""
    runs, sweeps = load(paths)
    out = out or default_out(paths)
    _matplotlib()  # fails early, in one line, without it
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(f"--out {out}: {err.strerror or err}") from None
    plotter = Plotter(out)
    plots = run_plots(plotter, runs)
    sections = []
    for sweep in sweeps:
        metric = final_metric([t.run for t in sweep.trials if t.run])
        prefix = "sweep_" if len(sweeps) == 1 else f"sweep_{re.sub(r'[^A-Za-z0-9._-]+', '_', sweep.path.name)}_"
        sections.append((sweep, metric, sweep_plots(plotter, sweep, metric, prefix)))
    (out / "plots.json").write_text(json.dumps(plotter.shown, indent=2) + "\n")
    (out / "report.md").write_text(markdown(runs, sweeps, plots, sections))
    return out, ["report.md", *plotter.shown, "plots.json"]
