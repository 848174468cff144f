"""conveyor: pipeline-parallel training for PyTorch."""

from . import losses
from .launch import run_ranks, spawn
from .pipeline import Pipeline
from .schedules import SCHEDULES, Action, Kind, PipelineSpec, Program, ScheduleError, build_schedule, validate
from .split import Split, manual_split, pipe_split, split_model, trace_split
from .trainer import Trainer, TrainSettings, TrainSummary

__all__ = [
    "SCHEDULES",
    "Action",
    "Kind",
    "Pipeline",
    "PipelineSpec",
    "Program",
    "ScheduleError",
    "Split",
    "TrainSettings",
    "TrainSummary",
    "Trainer",
    "build_schedule",
    "losses",
    "manual_split",
    "pipe_split",
    "run_ranks",
    "spawn",
    "split_model",
    "trace_split",
    "validate",
]

__version__ = "0.1.0"
