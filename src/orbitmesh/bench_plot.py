"""``orbitmesh bench --plot``: each targeted workload's ratio to its baseline next to its target.

:func:`plot_bars` prepares the data from a report's JSON dict (no matplotlib needed);
:func:`write_png` draws it, and needs matplotlib (the optional extra ``orbitmesh[plot]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bar:
    """One workload: its ratio to the baseline (or, for an absolute-only target such as idle CPU,
    its figure as a fraction of the target), the target on the same scale, and the verdict."""

    key: str
    label: str
    value: float
    target: float
    higher_is_better: bool
    met: bool


def plot_bars(report: dict[str, Any]) -> list[Bar]:
    """The bars for every row of ``report["workloads"]`` that has a target."""
    bars = []
    for key, row in report["workloads"].items():
        if row.get("met") is None:
            continue
        higher = not str(row.get("target") or row.get("absolute_target") or "").startswith("<=")
        if row.get("met_ratio") is not None and row.get("ratio") is not None:
            target = float(str(row["target"]).split()[1].rstrip("x"))
            bars.append(Bar(key, row["label"], float(row["ratio"]), target, higher, bool(row["met_ratio"])))
        elif row.get("met_absolute") is not None:
            goal = float(str(row["absolute_target"]).split()[1].replace(",", ""))
            label = f"{row['label']} [figure / {goal:g}]"
            bars.append(Bar(key, label, float(row["orbitmesh"]) / goal, 1.0, higher, bool(row["met_absolute"])))
    return bars


def write_png(report: dict[str, Any], path: str) -> None:
    """Draw the bars of ``report`` to ``path`` (PNG); ImportError without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("matplotlib is not installed (pip install 'orbitmesh[plot]')") from exc
    bars = plot_bars(report)
    height = 0.9 + 0.38 * max(1, len(bars))
    fig, ax = plt.subplots(figsize=(8.5, height), dpi=90)
    try:
        ys = list(range(len(bars)))[::-1]
        colors = ["#3a923a" if bar.met else "#c0392b" for bar in bars]
        ax.barh(ys, [bar.value for bar in bars], color=colors, height=0.6)
        for y, bar in zip(ys, bars, strict=True):
            ax.plot([bar.target, bar.target], [y - 0.4, y + 0.4], color="black", linewidth=2)
            sign = ">=" if bar.higher_is_better else "<="
            ax.text(
                max(bar.value, bar.target), y, f"  {bar.value:.2f}x ({sign} {bar.target:g})", va="center", fontsize=8
            )
        ax.set_yticks(ys)
        ax.set_yticklabels([bar.label for bar in bars], fontsize=8)
        ax.set_xlabel("OrbitMesh / baseline (same run); black tick: target; green met, red missed", fontsize=8)
        machine = report.get("machine", {})
        load = machine.get("load_average") or ["?"]
        ax.set_title(
            f"orbitmesh bench: {machine.get('cpus', '?')} CPUs (load average {load[0]}), "
            f"Python {machine.get('python', '?')}, libzmq {machine.get('libzmq', '?')}",
            fontsize=9,
        )
        top = max([bar.value for bar in bars] + [bar.target for bar in bars] + [1.0])
        ax.set_xlim(0, top * 1.45)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


__all__ = ["Bar", "plot_bars", "write_png"]
