"""Timeline pictures in the style of the GPipe and PipeDream figures, for simulated and measured runs alike.

A row per rank, time across; forward, backward and weight-gradient work in
distinct colours, each box labelled with its micro-batch; gaps are bubbles.
Needs matplotlib (`pip install conveyor[plot]`), imported only when drawing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..schedules import Kind, Program, Timing

__all__ = ["Span", "spans_from_timing", "draw_timeline"]

COLOURS = {
    "F": "#6baed6",
    "B": "#fd8d3c",
    "W": "#74c476",
    "RD": "#9e9ac8",
    "OF": "#e7298a",
    "RL": "#a6761d",
    "wait": "#d9d9d9",
}


@dataclass(frozen=True)
class Span:
    """One box of a timeline: `kind` (F, B, W, RD: a reduction of tied gradients, OF and RL: host copies, or wait)
    of micro-batch `mb` (None for a whole mini-batch) on `stage`, on `rank`."""

    rank: int
    kind: str
    stage: int
    mb: int | None
    start: float
    end: float


def spans_from_timing(program: Program, timing: Timing) -> list[Span]:
    """The compute actions (and reductions and host copies that keep their rank busy) of a simulated or validated
    program, as timeline boxes."""
    spans = []
    for rank, actions in program.actions.items():
        for action, start, end in zip(actions, timing.start[rank], timing.end[rank], strict=True):
            busy = action.kind.is_host_copy and end > start  # copies without a copy stream (the CPU's)
            if action.kind.is_compute or action.kind is Kind.REDUCE or busy:
                spans.append(Span(rank, action.kind.value, action.stage, action.mb, start, end))
    return spans


def draw_timeline(spans: Sequence[Span], path: str | Path, title: str = "", unit: str = "") -> Path:
    """Draw `spans` to an image at `path` (PNG, SVG or PDF, by its suffix) and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not spans:
        raise ValueError("nothing to draw: no spans")
    ranks = sorted({s.rank for s in spans})
    origin = min(s.start for s in spans)
    width = max(s.end for s in spans) - origin
    stages_per_rank = max(len({s.stage for s in spans if s.rank == r}) for r in ranks)
    figure, axes = plt.subplots(figsize=(min(24, 4 + 0.35 * len(spans) / len(ranks)), 0.6 * len(ranks) + 1.4))
    for span in spans:
        row = ranks.index(span.rank)
        left, length = span.start - origin, span.end - span.start
        # Later virtual stages of a rank are drawn darker, so looped schedules stay readable.
        shade = (
            1.0
            if stages_per_rank == 1
            else 0.55 + 0.45 * (1 - (span.stage // len(ranks)) / max(1, stages_per_rank - 1))
        )
        axes.barh(
            row,
            length,
            left=left,
            height=0.8,
            color=COLOURS.get(span.kind, "#999999"),
            edgecolor="black",
            linewidth=0.4,
            alpha=shade,
            hatch="//" if span.kind == "wait" else None,
        )
        if span.mb is not None and span.kind != "wait" and length > width / 120:
            axes.text(left + length / 2, row, str(span.mb), ha="center", va="center", fontsize=7)
    axes.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    axes.invert_yaxis()
    axes.set_xlim(0, width)
    axes.set_xlabel(f"time{f' ({unit})' if unit else ''}")
    kinds = [k for k in COLOURS if any(s.kind == k for s in spans)]
    axes.legend(
        handles=[Patch(color=COLOURS[k], label=k) for k in kinds],
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        ncol=len(kinds),
        frameon=False,
    )
    if title:
        axes.set_title(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path
