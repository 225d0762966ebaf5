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
