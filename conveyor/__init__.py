"""conveyor: pipeline-parallel training for PyTorch."""

from .launch import spawn
from .pipeline import Pipeline
from .schedules import SCHEDULES, Action, Kind, Program, ScheduleError, build_schedule, validate
from .split import split_model

__all__ = [
    "SCHEDULES",
    "Action",
    "Kind",
    "Pipeline",
    "Program",
    "ScheduleError",
    "build_schedule",
    "spawn",
    "split_model",
    "validate",
]

__version__ = "0.1.0"
