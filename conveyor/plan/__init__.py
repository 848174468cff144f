"""Planning: profile a model per layer, choose where to cut it, and the schedule, micro-batches and recompute
that train it fastest within memory (`conveyor plan`)."""

from .cost import MemoryModel, stage_costs
from .layers import (
    SPLITS,
    fingerprint,
    layer_split,
    profile_model,
    traced_fingerprint,
    traced_layer_split,
    with_measured_transfers,
)
from .partition import EXACT_LIMIT, METHODS, Partition, PlanError, count_splits, partition, splits
from .plan_file import Plan, StageSummary, split_with_plan
from .profiles import cached_profile, read_profiles, store_profile, write_profiles
from .search import Refused, make_plan, search

__all__ = [
    "EXACT_LIMIT",
    "METHODS",
    "SPLITS",
    "MemoryModel",
    "Partition",
    "Plan",
    "PlanError",
    "Refused",
    "StageSummary",
    "cached_profile",
    "count_splits",
    "fingerprint",
    "layer_split",
    "make_plan",
    "partition",
    "profile_model",
    "read_profiles",
    "search",
    "split_with_plan",
    "splits",
    "stage_costs",
    "store_profile",
    "traced_fingerprint",
    "traced_layer_split",
    "with_measured_transfers",
    "write_profiles",
]
