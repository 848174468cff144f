"""Text grids of a program: steps per rank, and compute on a unit clock."""

from __future__ import annotations

import re

from conveyor.schedules import PipelineSpec, build_schedule, render_steps, render_timeline, validate


def test_render_steps_one_f_one_b() -> None:
    program = build_schedule(PipelineSpec("1f1b", 2, 2))
    assert render_steps(program) == "\n".join(
        [
            "step    0       1       2       3       4       5       6       7       8",
            "rank 0   0F0     0SF0>1  0RB0<1  0F1     0SF1>1  0RB1<1  0B0     0B1     0STEP",
            "rank 1   1RF0<0  1F0     1RF1<0  1B0     1SB0>0  1F1     1B1     1SB1>0  1STEP",
        ]
    )


def test_render_steps_marks_a_cell_in_brackets() -> None:
    program = build_schedule(PipelineSpec("1f1b", 2, 2))
    assert render_steps(program, mark={(1, 2)}).splitlines()[2] == (
        "rank 1   1RF0<0  1F0    [1RF1<0] 1B0     1SB0>0  1F1     1B1     1SB1>0  1STEP"
    )


def test_render_timeline_gpipe_shows_the_bubble() -> None:
    program = build_schedule(PipelineSpec("gpipe", 3, 3))
    assert render_timeline(program, validate(program)) == "\n".join(
        [
            "tick    0   1   2   3   4   5   6   7   8   9",
            "rank 0  0F0 0F1 0F2 ... ... ... ... 0B0 0B1 0B2",
            "rank 1  ... 1F0 1F1 1F2 ... ... 1B0 1B1 1B2 ...",
            "rank 2  ... ... 2F0 2F1 2F2 2B0 2B1 2B2 ... ...",
        ]
    )


def test_render_timeline_one_f_one_b() -> None:
    program = build_schedule(PipelineSpec("1f1b", 2, 2))
    assert render_timeline(program, validate(program)) == "\n".join(
        [
            "tick    0   1   2   3   4   5",
            "rank 0  0F0 0F1 ... 0B0 ... 0B1",
            "rank 1  ... 1F0 1B0 1F1 1B1 ...",
        ]
    )


def _columns(header: str) -> dict[int, int]:
    """Where each step number starts in a header line."""
    return {int(found.group()): found.start() for found in re.finditer(r"\d+", header)}


def test_a_long_program_shows_a_window_around_the_mark_with_aligned_columns() -> None:
    program = build_schedule(PipelineSpec("gpipe", 2, 16))  # 44 actions on rank 1
    marked_step = 30
    lines = render_steps(program, mark={(0, marked_step)}).splitlines()
    header, row0, row1 = lines
    columns = _columns(header)
    steps = sorted(columns)
    assert steps == list(range(marked_step - 12, marked_step + 13))
    # Rows cut on both sides say so.
    assert row0.startswith("rank 0  ... ") and row0.endswith(" ...")
    assert row1.startswith("rank 1  ... ") and row1.endswith(" ...")
    # Every cell sits under its step number, the marked one included.
    for rank, row in ((0, row0), (1, row1)):
        for step in (steps[0], marked_step, steps[-1]):
            at = columns[step]
            text = str(program.actions[rank][step])
            cell = row[at : at + len(text) + 2]
            expected = f"[{text}]" if (rank, step) == (0, marked_step) else f" {text} "
            assert cell.rstrip() == expected.rstrip(), (rank, step, row)
