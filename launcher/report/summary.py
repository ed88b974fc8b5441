"""report.md, and writing a whole report."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from launcher.report.plots import Plotter, load_matplotlib, run_plots, sweep_plots
from launcher.report.runs import ReportError, Run, Sweep, load
from launcher.report.stats import final_metric, leaderboard, rate_key, seen_key, summary
from launcher.report.values import ABSENT, IGNORED_KEYS, config_differences, finite, fmt


def _num(value: Any, spec: str = ".4f") -> str:
    return format(value, spec) if finite(value) else "-"


def _bytes(value: Any) -> str:
    if not finite(value):
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
                      f"{s['median_mfu'] * 100:.2f}%" if finite(s.get("median_mfu")) else "-",
                      _bytes(s.get("peak_memory_bytes"))] for r, s in zip(runs, stats)])
    if len(runs) > 1:
        lines += ["", "## Config differences", ""]
        diffs = config_differences(runs)
        aside = " and ".join(f"`{k}`" for k in IGNORED_KEYS)
        if diffs:
            lines += [f"Keys of `config.yaml` whose values differ ({aside} aside):", ""]
            lines += _table(["key", *(r.label for r in runs)], [[f"`{k}`", *map(fmt, v)] for k, v in diffs],
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
            values = [fmt(t.setting.get(k, ABSENT)) for k in sweep.keys]
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
    load_matplotlib()  # fails early, in one line, without it
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
