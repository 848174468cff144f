"""Schedules as data: generators, lowering, validation and text rendering. No torch here."""

from __future__ import annotations

from .actions import Action, Channel, Kind, Link, Program, parse_action, parse_actions
from .building_block import Block, v_block, v_half, v_min, v_schedule
from .catalog import SCHEDULES, ScheduleInfo, build_schedule, schedule_info
from .dualpipe import dualpipev
from .gpipe import gpipe
from .graph import Edge, StageGraph, Tie
from .interleaved import interleaved_1f1b, looped_bfs
from .lowering import forward_only, fuse_backwards, insert_reductions, insert_transfers, lower, prefetch_receives
from .offload import insert_offloads, offload_stages, offloaded
from .one_f_one_b import one_f_one_b
from .pipedream import (
    noam,
    pipedream,
    pipedream_2bw,
    replica_gradient_scale,
    step_group,
    versions_from_steps,
    versions_held,
)
from .render import render_steps, render_timeline
from .spec import NONFINITE, PRECISIONS, RECOMPUTE, PipelineSpec, recomputed_stages
from .validate import DeadlockError, ScheduleError, Timing, split_backwards, validate
from .zero_bubble import zb_h1, zb_h2, zbv

__all__ = [
    "Action",
    "Block",
    "DeadlockError",
    "Edge",
    "Kind",
    "Channel",
    "Link",
    "NONFINITE",
    "PRECISIONS",
    "PipelineSpec",
    "RECOMPUTE",
    "Program",
    "SCHEDULES",
    "StageGraph",
    "ScheduleError",
    "ScheduleInfo",
    "Tie",
    "Timing",
    "build_schedule",
    "dualpipev",
    "forward_only",
    "fuse_backwards",
    "gpipe",
    "insert_reductions",
    "insert_transfers",
    "insert_offloads",
    "interleaved_1f1b",
    "looped_bfs",
    "lower",
    "noam",
    "offload_stages",
    "offloaded",
    "one_f_one_b",
    "parse_action",
    "parse_actions",
    "pipedream",
    "pipedream_2bw",
    "replica_gradient_scale",
    "step_group",
    "prefetch_receives",
    "recomputed_stages",
    "render_steps",
    "render_timeline",
    "schedule_info",
    "split_backwards",
    "v_block",
    "v_half",
    "v_min",
    "v_schedule",
    "validate",
    "versions_from_steps",
    "versions_held",
    "zb_h1",
    "zb_h2",
    "zbv",
]
