"""Memory held for backward on real ranks equals the simulator's prediction, offload and recompute included.

Runs benchmarks/memory_schedules.py small (2 spawned gloo ranks): for 1f1b, zbv, v-half and v-min, each with
nothing, offload, recompute, and recompute with the last stage offloading, the busiest rank's measured peak
bytes (`track_memory`, the executor's rank peak) against the simulator's walk of the same program with each
stage's bytes per micro-batch. The bytes are exact counts, so the tolerance is none.
"""

from __future__ import annotations

import pytest

from benchmarks.memory_schedules import OPTIONS, SCHEDULE_NAMES, Config, run


@pytest.mark.timeout(300)
def test_measured_peaks_are_the_simulated_ones_and_offload_lowers_them_as_predicted() -> None:
    results = run(Config(ranks=2, microbatches=4, rows=32, dim=16, steps=1, warmup=0, rounds=1))
    assert set(results) == {f"{name}/{option}" for name in SCHEDULE_NAMES for option in OPTIONS}
    for key, result in results.items():
        assert result["measured_bytes"] == pytest.approx(result["predicted_bytes"], rel=0, abs=0), key
    for name in ("zbv", "v-min"):  # on 2 ranks these offload micro-batches that matter at their peak
        plain, moved = results[f"{name}/plain"], results[f"{name}/offload"]
        assert moved["offloaded_microbatches"] > 0
        assert max(moved["measured_bytes"]) < max(plain["measured_bytes"])
    assert results["1f1b/offload"]["offloaded_microbatches"] == 0  # 1F1B on 2 ranks leaves no room to offload
