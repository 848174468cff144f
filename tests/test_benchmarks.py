"""Smoke tests of benchmarks/: every script runs to its end on a tiny model and prints (or writes) its result.

A benchmark that crashes after measuring (a key renamed in its table, an API it still calls the old way)
goes unnoticed until someone needs its numbers; these tests catch that in CI. Each runs the script the way
docs/benchmarks.md does, as `python benchmarks/NAME.py ...` from the repository root in a subprocess, on the
smallest sizes it accepts, and checks what a reader of its output relies on: the table's header and rows,
the JSON keys. The figures themselves mean nothing at these sizes and are not checked, except where a
benchmark states an identity (the same first-step loss from every engine, a pipeline's loss equal to its
single-process rule's).

Each test spawns processes (2 ranks, gloo), so each takes seconds on a quiet 2-core machine and more on a
loaded one; the timeouts allow for a loaded machine. `benchmarks/plan_measure.py` is a module, not a
script: the three plan benchmarks (plan_large_vocab, plan_search, host_memory) run it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
MODULES = {"plan_measure.py"}  # imported by the plan benchmarks, not run
TIMEOUT_S = 280  # below pytest's 300 s, so a hung script fails with its output rather than a bare timeout
NO_WAIT = ["--quiet-wait-s", "0"]  # measure at once: a test's timings are not kept, and CI's machine is busy

SMOKED: set[str] = set()
F = TypeVar("F", bound=Callable[..., None])


def smoke(script: str) -> Callable[[F], F]:
    """Mark a test as the smoke test of benchmarks/`script`, for `test_every_benchmark_has_a_smoke_test`."""

    def register(test: F) -> F:
        SMOKED.add(script)
        return test

    return register


def run(script: str, *args: str) -> str:
    """Run benchmarks/`script` with `args` from the repository root (this checkout's conveyor first on the
    path, as for a user who runs it there); its stdout. Fails with the script's stderr when it exits non-zero."""
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    try:
        done = subprocess.run(
            [sys.executable, str(BENCHMARKS / script), *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"benchmarks/{script} {' '.join(args)} ran past {TIMEOUT_S} s; stderr:\n{error.stderr}")
    if done.returncode != 0:
        pytest.fail(
            f"benchmarks/{script} {' '.join(args)} exited with {done.returncode}; stdout:\n{done.stdout[-3000:]}\n"
            f"stderr:\n{done.stderr[-6000:]}"
        )
    return done.stdout


def test_every_benchmark_has_a_smoke_test() -> None:
    scripts = {path.name for path in BENCHMARKS.glob("*.py")} - MODULES
    assert scripts - SMOKED == set(), "add a smoke test here for each new script in benchmarks/"
    assert SMOKED - scripts == set(), "a smoke test names a script benchmarks/ does not have"


# The command of issue 28's check, measured at once and never measured again (a busy machine disturbs every step).
SCHEDULES_TINY = ["--rounds", "1", "--steps", "2", "--warmup", "1", "--dim", "32", "--layers", "2", "--seq", "16"]


@smoke("bench_schedules.py")
@pytest.mark.timeout(300)
def test_bench_schedules_prints_its_table() -> None:
    out = run("bench_schedules.py", *SCHEDULES_TINY, "--microbatches", "4", "--retries", "0", *NO_WAIT)
    assert "2 ranks x 1 thread, 4 micro-batches of 2x16 tokens, schedule 1f1b, GPT 2 layers, dim 32" in out
    header = next(line for line in out.splitlines() if line.startswith("method"))
    assert header.split()[:4] == ["method", "median", "ms", "min"] and "1st loss" in header
    for row in ("A conveyor 1f1b", "B torch Schedule1F1B", "C one process", "E the work alone, ranks at once"):
        assert any(line.startswith(row) for line in out.splitlines()), f"no row {row!r} in:\n{out}"
    assert "conveyor / torch step time:" in out and "conveyor speedup over one process:" in out
    assert "what this machine allows: E's step x 1.2500" in out  # 1F1B's idle time, 2 ranks, 4 micro-batches
    # conveyor, torch's pipelining, one process and the work alone: the same model, weights and batch.
    spread = float(re.search(r"first-step loss spread across methods: (\S+)", out).group(1))  # type: ignore[union-attr]
    assert spread < 1e-5, out


@smoke("bench_schedules.py")
@pytest.mark.timeout(300)
def test_bench_schedules_json_for_a_v_schedule_with_a_baseline() -> None:
    """Two stages per rank (torch's multi-stage schedule class) and method D, as JSON."""
    args = [*SCHEDULES_TINY, "--layers", "4", "--microbatches", "4", "--retries", "0", *NO_WAIT]
    summary = json.loads(run("bench_schedules.py", *args, "--schedule", "zbv", "--baseline", "1f1b", "--json"))
    assert set(summary["methods"]) == {"conveyor", "torch", "single", "work", "baseline"}
    assert summary["config"]["schedule"] == "zbv" and len(summary["stage_ms"]) == 4
    for method in summary["methods"].values():  # a step another process disturbed is set aside
        assert 1 <= method["steps"] <= 2 and method["median_ms"] > 0
    assert {"conveyor_over_torch", "conveyor_over_baseline", "conveyor_fraction_of_ideal"} <= set(summary["ratios"])
    assert summary["ratios"]["conveyor_over_torch_by_round"] > 0
    for name, method in summary["methods"].items():  # per rank, the step less its main thread's CPU time
        assert len(method["rank_idle_ms"]) == (1 if name == "single" else 2), method
        assert all(0 <= t < method["max_ms"] for t in method["rank_idle_ms"]), method
    ratios = summary["ratios"]
    assert 1 < ratios["schedule_span_factor"] < 1.25  # zbv idles a little, less than 1F1B's fill and drain
    work = summary["methods"]["work"]["median_ms"]
    assert ratios["machine_limit_ms"] == pytest.approx(work * ratios["schedule_span_factor"])
    assert summary["loss_spread"] < 1e-5


@smoke("bench_overhead.py")
@pytest.mark.timeout(300)
def test_bench_overhead_compares_conveyor_with_the_plain_loop_and_profiles_it() -> None:
    tiny = ["--dim", "16", "--layers", "2", "--seq", "8", "--rounds", "1", "--steps", "1", "--warmup", "1"]
    summary = json.loads(run("bench_overhead.py", *tiny, "--cases", "1f1b:1,looped-bfs:2", "--profile", "--json"))
    assert [(c["schedule"], c["stages"]) for c in summary["cases"]] == [("1f1b", 1), ("looped-bfs", 2)]
    for case in summary["cases"]:
        assert set(case["over_plain"]) == {"plain", "by hand", "conveyor", "torch"}
        assert case["over_plain"]["plain"] == 1.0 and case["cpu_ms"]["conveyor"] > 0
        if case["schedule"] == "1f1b":  # one micro-batch at a time on one stage
            assert list(case["memory"]["needed"].values()) == [1], case["memory"]
        profile = case["profile"]
        parts = {p["part"] for p in profile["parts"]}
        assert {"module forward", "autograd backward", "executor: dispatch and routing"} <= parts, parts
        assert profile["runtime_us_per_action"] > 0 and "tracer_us_per_action" in profile
    # Every method trains the same model from the same weights on the same batch.
    assert summary["loss_spread"] < 1e-5
    out = run("bench_overhead.py", *tiny, "--cases", "interleaved-1f1b:2")
    assert re.search(r"^  conveyor +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+", out, re.M), out
    assert "micro-batches held per stage: the schedule needs 2, 1; conveyor held" in out, out


@smoke("count_overhead.py")
@pytest.mark.timeout(300)
def test_count_overhead_counts_each_method_under_callgrind() -> None:
    tiny = ["--dim", "16", "--layers", "2", "--seq", "8", "--steps", "1", "--warmup", "1", "--cases", "looped-bfs:2"]
    # The counted process itself, without valgrind: it builds the method and runs its steps.
    assert run("count_overhead.py", *tiny, "--child", "conveyor", "--no-toggle").strip() == (
        "conveyor: counted 1 steps of looped-bfs:2"
    )
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed: the counts themselves are not checked")
    # Under callgrind (about a minute: importing torch under valgrind).
    summary = json.loads(run("count_overhead.py", *tiny, "--methods", "plain,conveyor", "--cache-sim", "--json"))
    [case] = summary["cases"]
    plain, conveyor = case["per_step"]["plain"], case["per_step"]["conveyor"]
    # One step of the tiny model is tens of millions of instructions; two stages cost more than none.
    assert 1e7 < plain["Ir"] < conveyor["Ir"] < 2 * plain["Ir"], case
    assert {"I1mr", "D1mr", "DLmr", "DLmw"} <= set(conveyor), conveyor
    assert case["instructions_over_plain"]["plain"] == 1.0


@smoke("bench_async.py")
@pytest.mark.timeout(300)
def test_bench_async_reports_rates_and_weight_versions(tmp_path: Path) -> None:
    tiny = ["--rounds", "1", "--batches", "1", "--microbatches", "2", "--size", "1", "--seq", "8", "--dim", "16"]
    out = run("bench_async.py", *tiny, "--layers", "2", "--json", str(tmp_path / "async.json"))
    assert re.search(r"^pipedream-2bw +\d+\.\d samples/s +x\d\.\d{3} of 1f1b", out, re.MULTILINE), out
    assert "versions held (bound" in out
    summary = json.loads((tmp_path / "async.json").read_text())
    for name in ("1f1b", "pipedream", "pipedream-2bw"):
        assert summary[name]["samples_per_s"] > 0 and len(summary[name]["per_rank"]) == 2
        for rank in summary[name]["per_rank"]:
            assert 1 <= rank["versions"] <= rank["bound_versions"]
    assert "vs_1f1b" in summary["pipedream"] and "faster_rounds" in summary["pipedream-2bw"]


@smoke("bench_recv_order.py")
@pytest.mark.timeout(300)
def test_bench_recv_order_prints_both_orders() -> None:
    out = run("bench_recv_order.py", "--steps", "6", "--rounds", "1", "--size", "4")
    for order in ("early receive", "late  receive"):
        assert re.search(rf"^{order}: posting median +\d+\.\d+ ms \(max +\d+\.\d+\), waiting", out, re.MULTILINE), out


@smoke("split_backward_cost.py")
@pytest.mark.timeout(120)
def test_split_backward_cost_prints_b_plus_w_against_a_whole_backward() -> None:
    out = run("split_backward_cost.py", "--rounds", "1", "--repeats", "3", "--dim", "32", "--seq", "8")
    line = r"whole backward [\d.]+ ms; +B [\d.]+ ms \+ W [\d.]+ ms = [\d.]+ ms \([+-][\d.]+%\)\n"
    assert re.fullmatch(line, out), out


@smoke("predict_step_time.py")
@pytest.mark.timeout(300)
def test_predict_step_time_predicts_and_measures() -> None:
    tiny = ["--microbatches", "2", "--batch-size", "2", "--context", "8", "--dim", "16", "--layers", "2"]
    report = json.loads(run("predict_step_time.py", "--schedules", "1f1b", *tiny, "--steps", "1", "--json"))
    (row,) = report["rows"]
    assert row["schedule"] == "1f1b" and row["predicted_s"] > 0 and row["measured_s"] > 0
    assert {"error", "costs", "latency_s", "send_s", "recv_s"} <= set(row) and len(row["costs"]) == 2


@smoke("plan_large_vocab.py")
@pytest.mark.timeout(300)
def test_plan_large_vocab_compares_auto_with_the_even_split(tmp_path: Path) -> None:
    model = ["--microbatches", "2", "--microbatch-size", "1", "--context", "8", "--dim", "16", "--layers", "2"]
    measure = ["--vocab", "64", "--steps", "1", "--rounds", "1", "--repeats", "1", *NO_WAIT]
    out = run("plan_large_vocab.py", "--schedules", "1f1b", *model, *measure, "--json", str(tmp_path / "lv.json"))
    assert "schedule   split    blocks/stage    predicted   measured" in out
    assert re.search(r"^1f1b: auto is \d+\.\d{3}x faster than the even split \(predicted \d+\.\d{3}x\)", out, re.M)
    report = json.loads((tmp_path / "lv.json").read_text())
    assert {"command", "started", "machine", "commit", "profiles", "rows"} <= set(report)
    assert [(row["schedule"], row["method"]) for row in report["rows"]] == [("1f1b", "auto"), ("1f1b", "uniform")]
    for row in report["rows"]:
        assert sum(row["layers_per_stage"]) == 2 and row["measured_s"] > 0
        assert {"predicted_s", "error", "replayed_s", "model_error", "each_error", "replayed_each_s"} <= set(row)


@smoke("plan_search.py")
@pytest.mark.timeout(300)
def test_plan_search_trains_its_first_entry_and_the_default(tmp_path: Path) -> None:
    model = ["--microbatch-counts", "2", "--batch-size", "2", "--dim", "16", "--layers", "2", "--context", "8"]
    measure = ["--steps", "1", "--rounds", "1", "--top", "2", *NO_WAIT]
    out = run("plan_search.py", *model, *measure, "--json", str(tmp_path / "search.json"))
    assert "configurations ranked;" in out and re.search(r"^best / default measured: \d+\.\d{3}$", out, re.M), out
    report = json.loads((tmp_path / "search.json").read_text())
    assert report["ranking"] and {"schedule", "virtual", "microbatches", "predicted_s"} <= set(report["ranking"][0])
    best, default = report["rows"]
    assert (best["which"], default["which"]) == ("best", "default")
    assert (default["schedule"], default["microbatches"]) == ("1f1b", 4) and best["measured_s"] > 0


@smoke("plan_profile_spread.py")
@pytest.mark.timeout(300)
def test_plan_profile_spread_prints_each_configuration() -> None:
    tiny = ["--profiles", "2", "--repeats", "1", "--batch-size", "8", "--dim", "16", "--layers", "2", "--context", "8"]
    out = run("plan_profile_spread.py", *tiny)
    for configuration in ("dualpipev m=8 auto", "1f1b m=8 auto", "1f1b m=4 uniform"):
        assert re.search(rf"^{configuration}: [\d.]+ [\d.]+ ms; spread [\d.]+%$", out, re.M), out


@smoke("host_memory.py")
@pytest.mark.timeout(300)
def test_host_memory_compares_kept_with_glibcs_default(tmp_path: Path) -> None:
    pytest.importorskip("transformers")  # GPT-2 is the [hf] extra
    # One case of three (each is two runs of spawned ranks): the traced GPT-2 on a V schedule, the most moving parts.
    tiny = ["--steps", "1", "--rounds", "1", "--dim", "16", "--layers", "2", "--context", "8", *NO_WAIT]
    out = run("host_memory.py", *tiny, "--cases", "gpt2:dualpipev:auto", "--json", str(tmp_path / "memory.json"))
    line = r"^gpt2 +dualpipev +\[.+\]: kept [\d.]+ ms, glibc's default [\d.]+ ms, ratio [\d.]+"
    assert re.search(line, out, re.M), out
    (row,) = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert (row["model"], row["schedule"], len(row["layers_per_stage"])) == ("gpt2", "dualpipev", 4)
    assert row["kept_s"] > 0 and row["default_s"] > 0 and row["ratio"] == row["kept_s"] / row["default_s"]


@smoke("async_convergence.py")
@pytest.mark.timeout(300)
def test_async_convergence_matches_each_pipeline_with_its_single_process_rule(tmp_path: Path) -> None:
    tiny = ["--steps", "5", "--dim", "16", "--layers", "2", "--context", "8", "--batch-size", "4"]
    # pipedream runs as pipedream-2bw does (`conveyor train --schedule NAME`); leaving it out saves a training run.
    schedules = ["--schedules", "1f1b,pipedream-2bw"]
    out = run("async_convergence.py", *tiny, *schedules, "--json", str(tmp_path / "convergence.json"))
    assert re.search(r"^pipedream-2bw +\d+\.\d{4} +\([+-]\d+\.\d % against 1f1b\)$", out, re.M), out
    losses = json.loads((tmp_path / "convergence.json").read_text())["losses"]
    assert set(losses) == {"1f1b", "pipedream-2bw", "one process", "one process, 2BW's rule"}
    # `conveyor train` prints its loss to 4 decimals; the single-process rules are computed here in full.
    assert losses["1f1b"] == pytest.approx(losses["one process"], abs=1e-4)
    assert losses["pipedream-2bw"] == pytest.approx(losses["one process, 2BW's rule"], abs=1e-4)


@smoke("fault_trials.py")
@pytest.mark.timeout(300)
def test_fault_trials_reports_every_trial(tmp_path: Path) -> None:
    out = run("fault_trials.py", "--trials", "1", "--json", str(tmp_path / "faults.json"))
    assert re.search(r"^1000: .+: [\d.]+ s, named=(True|False)$", out, re.M), out
    assert "1 trials (" in out and "victim named in" in out and "slowest exit" in out
    (trial,) = json.loads((tmp_path / "faults.json").read_text())
    assert {"seconds", "named", "error"} <= set(trial)


@pytest.mark.parametrize("doc", ["docs/benchmarks.md", "docs/planning.md", "docs/reliability.md"])
def test_every_result_file_a_doc_names_exists(doc: str) -> None:
    """The reference pages name their result files literally (or by a glob); each must be in the tree.
    docs/benchmarks-log.md may name files that were superseded and removed (git keeps them)."""
    names = re.findall(r"benchmarks/results/([\w.*{},-]+\.json)", (ROOT / doc).read_text())
    assert names or doc != "docs/benchmarks.md"
    for name in names:
        assert list((BENCHMARKS / "results").glob(name)), f"{doc} names benchmarks/results/{name}, which is missing"


@smoke("memory_schedules.py")
@pytest.mark.timeout(300)
def test_memory_schedules_measures_bytes_as_the_simulator_predicts(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    tiny = ["--rows", "8", "--dim", "16", "--steps", "1", "--rounds", "1", "--schedules", "v-min"]
    printed = run("memory_schedules.py", *tiny, "--options", "offload", "--json", str(out))
    assert "| schedule | option | measured MiB (busiest rank) | predicted MiB |" in printed
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"1f1b/plain", "1f1b/offload", "v-min/plain", "v-min/offload"}
    for key, result in results.items():  # the benchmark's claim: measured bytes are the predicted ones
        assert result["measured_bytes"] == pytest.approx(result["predicted_bytes"], rel=1e-9), key


@smoke("checkpoint_verify.py")
@pytest.mark.timeout(300)
def test_checkpoint_verify_times_each_part_of_a_verified_load(tmp_path: Path) -> None:
    out = tmp_path / "verify.json"
    printed = run("checkpoint_verify.py", "--repeats", "1", "--dim", "32", "--layers", "2", "--json", str(out))
    results = json.loads(out.read_text())
    assert json.loads(printed) == results
    assert {"verify_ms", "hash_files_ms", "metadata_reader_ms", "load_model_ms", "sha256_gb_s"} <= set(results)
    assert results["files"] >= 5 and results["bytes"] > results["metadata_bytes"] > 0
