"""The report's PNGs (matplotlib, Agg) and what each shows (plots.json)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.report.runs import ReportError, Run, Sweep
from launcher.report.stats import rate_key, seen_key, summary
from launcher.report.values import finite, fmt

MAX_POINTS = 5000  # per plotted line: longer series are thinned (statistics use every record)



def load_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("bigtrain report needs matplotlib: pip install matplotlib") from None
    return matplotlib, Figure, FigureCanvasAgg


def _colors(n: int) -> list[Any]:
    matplotlib, _, _ = load_matplotlib()
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
        # Earlier runs are drawn wider, so a run whose curve coincides with a later one's (the same memory,
        # the same schedule) still shows as a border around it instead of vanishing.
        order = list(dict.fromkeys(repr(line.get("color")) for line in lines))
        for line in lines:
            xs, ys = _thin(line["xs"], line["ys"])
            style = line.get("style", "-")
            later = len(order) - 1 - order.index(repr(line.get("color")))
            ax.plot(xs, ys, style, color=line.get("color"), label=line["label"] or "_nolegend_",
                    markersize=4 if "o" in style else None, linewidth=1.6 + 2.0 * later / max(len(order) - 1, 1))
        self._save(fig, ax, name, title, xlabel, ylabel, xscale)
        return True

    @staticmethod
    def _axes():
        _, Figure, FigureCanvasAgg = load_matplotlib()
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
        categorical = not all(finite(x) for x in xs)
        ticks = list(dict.fromkeys(fmt(x) for x in xs)) if categorical else []
        pos = [ticks.index(fmt(x)) for x in xs] if categorical else xs
        ax.plot(pos, ys, "o", color="tab:blue", label=label)
        for x, y, note in zip(pos, ys, notes):
            ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
        if categorical:
            ax.set_xticks(range(len(ticks)), ticks)
        self._save(fig, ax, name, title, xlabel, ylabel, xscale, points=len(ys))


def _xy(records: list[dict[str, Any]], xkey: str, ykey: str,
        scale: float = 1.0) -> tuple[list[float], list[float]]:
    pairs = [(r[xkey], r[ykey] * scale) for r in records if finite(r.get(xkey)) and finite(r.get(ykey))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _per_step(run: Run, key: str) -> float | None:
    """``key`` (tokens_seen, samples_seen) per step: they grow linearly with the step."""
    with_key = [r for r in run.metrics if finite(r.get(key)) and r["step"] > 0]
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
        done = [t for t in sweep.trials if finite(finals.get(t.index))]
        if not done:
            continue
        xs = [t.setting[key] for t in done]
        ys = [finals[t.index] for t in done]
        numeric = all(finite(x) for x in xs)
        log = (numeric and _lr_like(key) and min(xs) > 0 and max(xs) / min(xs) > 10)
        name = f"{prefix}{re.sub(r'[^A-Za-z0-9._-]+', '_', key)}.png"
        title = f"{sweep.path.name}: final {metric} against {key}"
        plotter.points(name, title, key, f"final {metric}", xs, ys, [f"sweep-{t.index}" for t in done],
                       "log" if log else "linear", label=f"{len(done)} trials")
        made.append((name, title))
    return made
