"""Generation backends behind one interface, imported lazily by name.

>>> backend = get_backend("transformers", GenerateConfig(model="smollm2-135m"))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import Generation, GenerationBackend

if TYPE_CHECKING:  # pragma: no cover
    from ..config import GenerateConfig

# name -> "module:Class"; modules are imported only when their backend is asked for, so an
# optional dependency (vllm, openai) that is not installed costs nothing until used.
BACKENDS: dict[str, str] = {
    "transformers": "inpars.backends.transformers_backend:TransformersBackend",
    "openai": "inpars.backends.openai_api:OpenAIBackend",
    "vllm": "inpars.backends.vllm_backend:VLLMBackend",
}


def backend_class(name: str) -> type[GenerationBackend]:
    """The backend class registered as ``name`` (imports its module)."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown generation backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
    module, _, cls = BACKENDS[name].partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise ConfigError(f"generation backend {name!r} is not installed ({e})") from e


def available_backends() -> list[str]:
    """Names of the backends whose dependencies import here."""
    names = []
    for name in BACKENDS:
        try:
            if backend_class(name).is_available():
                names.append(name)
        except ConfigError:
            pass
    return names


def get_backend(name: str, config: GenerateConfig) -> GenerationBackend:
    """Build backend ``name`` from the generate stage's config."""
    cls = backend_class(name)
    if not cls.is_available():
        raise ConfigError(f"generation backend {name!r} is not available here (missing dependencies)")
    return cls.from_config(config)


__all__ = ["BACKENDS", "Generation", "GenerationBackend", "available_backends", "backend_class", "get_backend"]
