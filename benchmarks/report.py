"""What a benchmark run leaves behind: a summary line, a small table, a JSON file and a PNG.

A workload fills one `BenchResult`; `write_result` stores it as
`<results_dir>/<workload>-<timestamp>.json` and a PNG of its plot panels next to it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class PlotPanel:
    """One grouped bar chart: `series[name][category] = value` in `unit`."""

    title: str
    unit: str
    series: dict[str, dict[str, float]]


@dataclass
class BenchResult:
    """Everything a workload reports."""

    workload: str
    summary: str
    metrics: dict[str, Any]
    table_headers: list[str]
    table_rows: list[list[Any]]
    panels: list[PlotPanel] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S"))

    def table(self) -> str:
        return format_table(self.table_headers, self.table_rows)


@dataclass(frozen=True)
class WrittenFiles:
    json_path: Path
    png_path: Path | None


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ratio(ours: float, theirs: float) -> float:
    """ours / theirs, NaN when either is missing or theirs is zero."""
    if not theirs or math.isnan(theirs) or math.isnan(ours):
        return math.nan
    return ours / theirs


def fmt(value: Any, digits: int = 1) -> str:
    """Numbers with `digits` decimals, NaN and None as '-', anything else as str."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:,.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with columns padded to their widest cell."""
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_result(result: BenchResult, results_dir: Path) -> WrittenFiles:
    """Write the JSON and the PNG of `result`; returns their paths."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"{result.workload}-{result.timestamp}"
    json_path = stem.with_suffix(".json")
    png_path = stem.with_suffix(".png")
    json_path.write_text(json.dumps(_jsonable(asdict(result)), indent=2) + "\n")
    try:
        write_plot(result, png_path)
    except ImportError as exc:
        logger.warning("no plot (%s); install matplotlib for the PNG", exc)
        return WrittenFiles(json_path, None)
    return WrittenFiles(json_path, png_path)


def write_plot(result: BenchResult, path: Path) -> None:
    """One grouped bar chart per panel, side by side (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = result.panels or [PlotPanel(result.workload, "", {})]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        _draw_panel(ax, panel)
    fig.suptitle(f"{result.workload}: {result.meta.get('model', '')} "
                 f"({result.meta.get('device', '')}, {result.meta.get('dtype', '')})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw_panel(ax: Any, panel: PlotPanel) -> None:
    categories = list(dict.fromkeys(c for values in panel.series.values() for c in values))
    num_series = max(len(panel.series), 1)
    width = 0.8 / num_series
    for index, (name, values) in enumerate(panel.series.items()):
        xs = [c + (index - (num_series - 1) / 2) * width for c in range(len(categories))]
        heights = [_finite(values.get(cat, math.nan)) for cat in categories]
        bars = ax.bar(xs, heights, width, label=name)
        ax.bar_label(bars, labels=[fmt(values.get(cat)) for cat in categories], fontsize=7)
    ax.set_xticks(range(len(categories)), categories, fontsize=8)
    ax.set_title(panel.title, fontsize=10)
    ax.set_ylabel(panel.unit)
    if panel.series:
        ax.legend(fontsize=8)


def _finite(value: float) -> float:
    return 0.0 if value is None or math.isnan(value) else value


def _jsonable(value: Any) -> Any:
    """NaN and infinity become None (JSON has neither); containers are walked."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
