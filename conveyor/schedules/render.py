"""Text pictures of a program: ranks down, steps (or clock ticks) across."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from .actions import Program

if TYPE_CHECKING:
    from .validate import Timing

__all__ = ["render_steps", "render_timeline"]

_WINDOW = 12  # columns shown on each side of a marked action


def render_steps(program: Program, mark: Collection[tuple[int, int]] = ()) -> str:
    """Each rank's actions in program order; marked (rank, index) cells in brackets.

    With marks, only the columns around the first mark are shown, so error
    messages stay readable for long programs.
    """
    ranks = range(program.num_ranks)
    width = max((len(str(a)) for acts in program.actions.values() for a in acts), default=1) + 2
    length = max((len(program.actions.get(r, [])) for r in ranks), default=0)
    first, last = 0, length
    if mark:
        centre = min(index for _, index in mark)
        first, last = max(0, centre - _WINDOW), min(length, centre + _WINDOW + 1)
    # Rows cut on the left start with "... "; pad the header alike so step numbers stay above their cells.
    header = "step    " + ("    " if first else "") + "".join(f"{i:<{width}}" for i in range(first, last))
    lines = [header.rstrip()]
    for rank in ranks:
        actions = program.actions.get(rank, [])
        cells = []
        for index in range(first, min(last, len(actions))):
            text = str(actions[index])
            cells.append(f"{'[' + text + ']' if (rank, index) in mark else ' ' + text + ' ':<{width}}")
        more = " ..." if last < len(actions) else ""
        lines.append((f"rank {rank:<3}" + ("... " if first else "") + "".join(cells)).rstrip() + more)
    return "\n".join(lines)


def render_timeline(program: Program, timing: Timing) -> str:
    """Compute actions placed at the clock tick they start (unit costs); blanks are bubbles."""
    ticks = int(timing.makespan)
    width = max((len(str(a)) for acts in program.actions.values() for a in acts if a.kind.is_compute), default=1) + 1
    lines = ["tick    " + "".join(f"{t:<{width}}" for t in range(ticks)).rstrip()]
    for rank in range(program.num_ranks):
        row = ["." * (width - 1) + " "] * ticks
        for action, begin, finish in zip(
            program.actions.get(rank, []), timing.start[rank], timing.end[rank], strict=True
        ):
            if action.kind.is_compute:
                for tick in range(int(begin), int(finish)):
                    row[tick] = f"{str(action):<{width}}"
        lines.append(f"rank {rank:<3}" + "".join(row).rstrip())
    return "\n".join(lines)
