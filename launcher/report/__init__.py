"""``bigtrain report RUN_DIR [RUN_DIR ...] [--out DIR]``: PNG plots of runs, overlaid, and a
Markdown summary (``report.md``) beside them; a sweep directory (``sweep-<i>/`` task dirs) adds a
leaderboard and its metric against each swept parameter. ``plots.json`` records what each plot
shows (title, axis labels, legend). Reads ``metrics.jsonl``, ``eval.jsonl`` and ``config.yaml``;
matplotlib (Agg), no torch: runs on login nodes.
"""

from launcher.report.runs import ReportError, load
from launcher.report.summary import write_report

__all__ = ["ReportError", "load", "write_report"]
