"""Shared pytest setup: make `conveyor` importable from a checkout, and keep hypothesis patient on slow CPUs."""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # Spawned ranks inherit sys.path, so they find conveyor (and tests/tiny_models.py) too.
    sys.path.insert(0, str(ROOT))

# A shared 2-core machine makes per-example timings noisy; a deadline would only add flakes.
settings.register_profile("conveyor", deadline=None, max_examples=100)
settings.load_profile("conveyor")
