"""The benchmark harness keeps working (a smoke run; numbers are not asserted:
speed is measured by scripts/bench and recorded in docs/benchmarks.md)."""

import os
import subprocess
from pathlib import Path

from conftest import ROOT, TOLLGATE


def test_the_compare_harness_runs_end_to_end_without_errors():
    bench = Path(os.environ.get("TOLLGATE_BENCH_BIN", ROOT / "target" / "debug" / "tollgate-bench"))
    out = subprocess.run(
        [str(bench), "--tollgate", TOLLGATE, "compare", "--secs", "0.2", "--concurrency", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| json") or line.startswith("| sse")]
    assert len(rows) == 4, out.stdout
    assert all(line.rstrip(" |").endswith("| 0") for line in rows), out.stdout
    assert "1 ms upstream" in out.stdout


def test_the_redis_backend_costs_one_round_trip_per_rate_limited_call():
    """`tollgate-bench state`: memory against redis on the same calls (every one has a
    rate limit), in both eras; the Redis round trips per call are counted by Tollgate
    itself (tollgate_state_round_trips_total), not timed."""
    bench = Path(os.environ.get("TOLLGATE_BENCH_BIN", ROOT / "target" / "debug" / "tollgate-bench"))
    out = subprocess.run(
        [str(bench), "--tollgate", TOLLGATE, "state", "--secs", "0.5", "--concurrency", "1,4"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    rows = [line.strip("| ").split(" | ") for line in out.stdout.splitlines()
            if line.startswith("| Handshake") or line.startswith("| Stateless")]
    assert len(rows) == 4, out.stdout
    for row in rows:
        trips, errors = float(row[-2]), int(row[-1])
        assert errors == 0, out.stdout
        # One script per call on the hot path; opening a session and refreshing its
        # expiry are the rest.
        assert 0.99 <= trips <= 1.05, out.stdout
