"""The benchmark harness keeps working (a smoke run; numbers are not asserted:
speed is measured by scripts/bench and recorded in docs/benchmarks.md)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TOLLGATE

BENCH = Path(os.environ.get("TOLLGATE_BENCH_BIN", ROOT / "target" / "debug" / "tollgate-bench"))


def compare(*args: str) -> str:
    out = subprocess.run(
        [str(BENCH), "--tollgate", TOLLGATE, "compare", "--secs", "0.2", "--concurrency", "1", *args],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def grid_rows(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("| json") or line.startswith("| sse")]


@pytest.mark.parametrize("load", ["builtin", "wrk"])
def test_the_compare_grid_runs_end_to_end_without_errors(load):
    if load == "wrk" and not shutil.which("wrk"):
        pytest.fail("wrk is not installed (tests/run installs it: apt-get install wrk)")
    stdout = compare("--quick", "--load", load)
    rows = grid_rows(stdout)
    assert len(rows) == 4, stdout
    # nginx measured beside Tollgate, and no call failed anywhere.
    assert all(line.split("|")[5].strip() not in ("-", "0") for line in rows), stdout
    assert all(line.rstrip(" |").endswith("| 0") for line in rows), stdout
    assert ("wrk -t1" in stdout) == (load == "wrk")
    assert "### Targets (1 run(s)" in stdout
    assert "| p99, JSON, stateless, c=1 (µs) | ≤ 1000 µs |" in stdout


def test_the_extra_cells_and_targets_are_measured():
    stdout = compare("--load", "builtin", "--idle-sessions", "300")
    for cell in ["audit log file", "1,000 rules", "1 MiB argument", "tools/list of 1,004 tools",
                 "300 idle sessions", "1 ms upstream"]:
        assert cell in stdout, stdout
    targets = stdout.split("### Targets", 1)[1]
    # The extras' targets have figures (those of the c=64 grid need --concurrency 64).
    names = ["with an audit log file", "1,000 rules vs 50", "tools/list of 1,004 tools",
             "RSS bytes per session", "1 ms upstream, c=64: tollgate"]
    if shutil.which("nginx"):  # tests/run installs it; the cell tells what any hop costs
        names.append("1 ms upstream, c=64: nginx")
    for name in names:
        (line,) = [l for l in targets.splitlines() if name in l]
        assert "not measured" not in line, line
        assert line.rstrip(" |").endswith(("pass", "miss", "-")), line


def test_the_redis_backend_costs_one_round_trip_per_rate_limited_call():
    """`tollgate-bench state`: memory against redis on the same calls (every one has a
    rate limit), in both eras; the Redis round trips per call are counted by Tollgate
    itself (tollgate_state_round_trips_total), not timed."""
    out = subprocess.run(
        [str(BENCH), "--tollgate", TOLLGATE, "state", "--secs", "0.5", "--concurrency", "1,4"],
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


def syscalls(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "callgrind"), TOLLGATE, "--calls", "300", "--syscalls", *args],
        capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["failed"] == 0, figures
    return figures


def test_a_call_costs_the_system_calls_of_two_exchanges_and_no_more():
    """A proxied call reads and writes each side once and waits twice, as nginx does. A
    lane never wakes its own driver: per call that was an eventfd write and one more
    epoll_wait, when the next request's header timeout came before the driver's planned
    wake-up (the upstream timeout)."""
    if not shutil.which("strace"):
        pytest.fail("strace is not installed (tests/run installs it: apt-get install strace)")
    for args in [(), ("--sse", "--era", "handshake")]:
        figures = syscalls(*args)
        by_name = figures["by_name"]
        # None per call (a stray one in the run, from a background task, may be).
        assert by_name.get("write", 0) < 0.05, figures
        # Two each. (The script sends a request's head and body in one `send`, as wrk
        # does: sent apart, a busy machine woke Tollgate between them now and then.)
        assert by_name["recvfrom"] == by_name["writev"] == 2.0, figures
        # The lanes' one-second tick adds a wait or two over the run.
        assert by_name["epoll_wait"] <= 2.05, figures
    # With an audit log, about one write per call: the decision, with the outcomes of
    # earlier calls (no timer per outcome, no wake-up for it). A write per outcome would be
    # two; on a busy machine an outcome now and then misses the next decision's write
    # (1.12 seen in a clean-clone CI run while a build ran beside it).
    figures = syscalls("--audit")
    assert figures["by_name"]["write"] <= 1.25, figures
