"""Seeing a pipeline: the simulator, traces of real runs, and timeline pictures."""

from .simulate import CostModel, Simulation, StageCosts, parse_costs, simulate

__all__ = ["CostModel", "Simulation", "StageCosts", "parse_costs", "simulate"]
