"""docker/ without a Docker engine (issue 18, point 10): the build context leaves out
what the image does not need, dependencies build in a layer of their own (checked by
running the stub step and cargo on the manifests alone), the image's default command
starts and passes its own HEALTHCHECK, a second target carries Node.js, Python and uv,
compose has no default admin token, and hadolint finds nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, TOLLGATE, Proc

DOCKERFILE = ROOT / "docker" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    found: dict[str, list] = {}
    current = None
    for word, rest in instructions():
        if word == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            found[current] = []
        if current is not None:  # an ARG before the first FROM is global
            found[current].append((word, rest))
    return found


def ignored_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [l.strip().rstrip("/") for l in lines if l.strip() and not l.startswith("#")]


def is_ignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        if pattern.startswith("**/"):
            if any(Path(*parts[: i + 1]).match(bare) for i in range(len(parts))):
                return True
        elif Path(*parts[: len(Path(pattern).parts)]).match(pattern):
            return True
    return False


def test_the_build_context_leaves_out_builds_venvs_and_node_modules():
    patterns = ignored_patterns()
    for heavy in ["target", "crates/mcp-tollgate/target", "tests/.venv", "tests/.venv-healthlake",
                  "tests/ts/node_modules", "tests/artifacts", ".git"]:
        assert is_ignored(heavy, patterns), heavy
    # Everything the Dockerfile copies from the context is in it (but for the `prebuilt`
    # target's, whose context is the directory scripts/image makes: test_image.py).
    for word, rest in [i for name, stage in stages().items() if name != "prebuilt" for i in stage]:
        if word == "COPY" and "--from" not in rest:
            *sources, _ = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert not is_ignored(source, patterns), f"{source} is copied but ignored"


def test_dependencies_build_from_the_manifests_alone(tmp_path):
    build = stages()["build"]
    copies = [rest.split() for word, rest in build if word == "COPY"]
    first_sources = copies.index(["crates", "crates"])
    manifests = {src for *sources, _ in copies[:first_sources] for src in sources}
    crates = {f"crates/{c.name}/Cargo.toml" for c in (ROOT / "crates").iterdir() if (c / "Cargo.toml").exists()}
    assert crates | {"Cargo.toml", "Cargo.lock"} == manifests, "every manifest is copied before the sources"
    # Run the stub step on the manifests alone, as the layer does, and let cargo load it.
    for manifest in manifests:
        (tmp_path / manifest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / manifest, tmp_path / manifest)
    stub = next(rest for word, rest in build if word == "RUN" and "fn main() {}" in rest)
    script = stub.split("&& cargo build")[0]
    subprocess.run(["sh", "-ec", script], cwd=tmp_path, check=True, timeout=60)
    out = subprocess.run(["cargo", "metadata", "--locked", "--offline", "--format-version", "1", "--no-deps"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "cargo build --release --locked -p mcp-tollgate" in stub
    # The real sources are built after they are copied in, and newer than the stubs.
    after = [rest for word, rest in build[build.index(("COPY", "crates crates")):] if word == "RUN"]
    assert any("touch" in r and "cargo build --release --locked -p mcp-tollgate" in r for r in after)


def test_the_default_image_starts_and_passes_its_healthcheck(procs, tmp_path):
    all_stages = stages()
    default = list(all_stages)[-1]
    assert default == "distroless", "a plain `docker build` gives the distroless image"
    final = dict((w, r) for w, r in all_stages[default])
    cmd = json.loads(final["CMD"])
    entrypoint = json.loads(final["ENTRYPOINT"])
    assert entrypoint == ["/usr/local/bin/tollgate"]
    # The CMD as the container runs it, on free ports here.
    args = [re.sub(r":(8080|9090)$", ":0", a) for a in cmd]
    env = {"TOLLGATE_RUNTIME_DIR": str(tmp_path / "runtime")}
    env.pop("TOLLGATE_ADMIN_TOKEN", None)
    proc = Proc([TOLLGATE, *args], tmp_path / "image.log", env=env, cwd=tmp_path)
    procs.append(proc)
    admin = proc.wait_line(r"Tollgate admin on http://0\.0\.0\.0:(\d+)/ \(token [0-9a-f]{32}")
    health = json.loads(final["HEALTHCHECK"].split("CMD", 1)[1])
    assert health == ["/usr/local/bin/tollgate", "health"]
    # It asks 127.0.0.1:9090, or where TOLLGATE_HEALTH_ADMIN says (test_image.py runs it).
    out = subprocess.run([TOLLGATE, *health[1:]], capture_output=True, timeout=30,
                         env={**os.environ, "TOLLGATE_HEALTH_ADMIN": f"http://127.0.0.1:{admin.group(1)}"})
    assert out.returncode == 0, out.stderr


def test_the_runtimes_target_can_start_npx_and_uvx_servers():
    runtimes = " ".join(f"{word} {rest}" for word, rest in stages()["runtimes"])
    for tool in ["nodejs", "npm", "python3", "uv"]:
        assert re.search(rf"\b{tool}\b", runtimes), tool
    assert "USER 65532:65532" in runtimes and "/usr/local/bin/tollgate" in runtimes



def test_the_runtimes_user_has_its_group(tmp_path):
    """USER 65532:65532 names a group too: the runtimes stage's own groupadd/useradd, run
    here on a minimal /etc under --prefix (the host's is not touched), make both."""
    run = next(rest for word, rest in stages()["runtimes"] if word == "RUN")
    steps = [step.strip() for step in run.split("&&")]
    users = [step for step in steps if step.split()[0] in ("groupadd", "useradd")]
    assert users, run
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (etc / "gshadow").write_text("root:*::\n")
    shutil.copy("/etc/login.defs", etc / "login.defs")
    for step in users:
        command, *args = step.split()
        out = subprocess.run([command, "--prefix", str(tmp_path), *args], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, (step, out.stderr)
    assert re.search(r"^nonroot:x:65532:", (etc / "group").read_text(), re.M), (etc / "group").read_text()
    assert re.search(r"^nonroot:x:65532:65532:", (etc / "passwd").read_text(), re.M), (etc / "passwd").read_text()


def test_compose_has_no_default_admin_token():
    compose = (ROOT / "docker" / "compose.yaml").read_text()
    token = re.search(r"TOLLGATE_ADMIN_TOKEN: (.*)", compose).group(1)
    assert ":-" not in token and token.startswith("${TOLLGATE_ADMIN_TOKEN:?"), token
    assert "change-me" not in compose


def test_hadolint_finds_nothing():
    hadolint = Path(sys.executable).parent / "hadolint"
    out = subprocess.run([str(hadolint), "--config", str(ROOT / "docker" / ".hadolint.yaml"), str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
