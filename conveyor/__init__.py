"""conveyor: pipeline-parallel training for PyTorch."""

from .launch import run_ranks, spawn
from .pipeline import Pipeline
from .schedules import SCHEDULES, Action, Kind, PipelineSpec, Program, ScheduleError, build_schedule, validate
from .split import Split, manual_split, pipe_split, split_model, trace_split

__all__ = [
    "SCHEDULES",
    "Action",
    "Kind",
    "Pipeline",
    "PipelineSpec",
    "Program",
    "ScheduleError",
    "Split",
    "build_schedule",
    "manual_split",
    "pipe_split",
    "run_ranks",
    "spawn",
    "split_model",
    "trace_split",
    "validate",
]

__version__ = "0.1.0"
