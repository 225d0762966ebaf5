"""The repository's scripts, run as a user or CI runs them (with stand-in tools where the
real one would take minutes: what is tested is the script's own judgement)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import ROOT

FUZZ_RUN = ROOT / "fuzz" / "run"


def fake_cargo(tmp_path: Path, build_output: str, build_code: int) -> dict:
    """A `cargo` whose `fuzz build` prints `build_output` and exits `build_code`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "build.out").write_text(build_output)
    cargo = bin_dir / "cargo"
    cargo.write_text(
        "#!/usr/bin/env bash\n"
        'case "$1 $2" in\n'
        '  "fuzz --version") echo "cargo-fuzz 0.13.1";;\n'
        f'  "fuzz build") cat {tmp_path / "build.out"}; exit {build_code};;\n'
        '  "fuzz list") echo framing;;\n'
        '  *) echo "unexpected: $*" >&2; exit 99;;\n'
        "esac\n"
    )
    cargo.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FUZZ_TARGET_DIR": str(tmp_path / "target")}


COMPILE_ERROR = """   Compiling tollgate-fuzz v0.0.0 (/src/fuzz)
error[E0599]: no method named `meta` found for reference `&Message` in the current scope
  --> fuzz_targets/framing.rs:20:63
   |
20 |     let _ = (message.kind(), message.method(), message.id(), message.meta());
   |                                                               ^^^^
error: could not compile `tollgate-fuzz` (bin "framing") due to 1 previous error
"""

NO_SANITIZER = """   Compiling libfuzzer-sys v0.4.9
error: failed to run custom build command for `libfuzzer-sys v0.4.9`
  error occurred in cc-rs: failed to find tool "c++": No such file or directory (os error 2)
"""


def test_a_fuzz_target_that_does_not_compile_fails_the_run(tmp_path):
    run = subprocess.run([str(FUZZ_RUN)], env=fake_cargo(tmp_path, COMPILE_ERROR, 101),
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert run.returncode == 1, (run.returncode, run.stdout, run.stderr)
    assert "FAILED: a fuzz target does not compile" in run.stdout
    assert "fuzz_targets/framing.rs:20:63" in run.stdout
    assert "SKIPPED" not in run.stdout


def test_fuzzing_is_skipped_saying_why_only_when_the_toolchain_cannot_fuzz(tmp_path):
    run = subprocess.run([str(FUZZ_RUN)], env=fake_cargo(tmp_path, NO_SANITIZER, 101),
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, (run.returncode, run.stdout, run.stderr)
    assert "SKIPPED: this toolchain cannot build fuzz targets" in run.stdout
    assert 'failed to find tool "c++"' in run.stdout


KUBERNETES = "1.33.0"  # the oldest version the manifests promise to run on


def test_the_kubernetes_manifests_follow_the_kubernetes_schemas():
    """deploy/kubernetes, strictly (no unknown field), against one pinned Kubernetes version."""
    import sys

    validate = Path(sys.executable).parent / "kubernetes-validate"
    manifests = sorted(p for p in (ROOT / "deploy" / "kubernetes").glob("*.yaml") if p.name != "kustomization.yaml")
    run = subprocess.run([str(validate), "-k", KUBERNETES, "--strict", "--quiet", *map(str, manifests)],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stdout + run.stderr
    kinds = subprocess.run([str(validate), "-k", KUBERNETES, *map(str, manifests)], capture_output=True, text=True,
                           timeout=120).stdout
    assert "networkpolicy/tollgate-redis" in kinds, kinds
