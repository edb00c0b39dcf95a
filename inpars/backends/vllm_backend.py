"""Offline generation with vLLM on an NVIDIA GPU (the CUDA image; ``pip install inpars[vllm]``).

vLLM batches all prompts itself (continuous batching) and, with ``enable_prefix_caching``, computes
the few-shot prefix that every prompt shares once. Per-token log-probs come from
``SamplingParams(logprobs=1)``: for each generated token a dict ``{token_id: Logprob}`` that always
holds the sampled token. ``vllm`` is imported only inside this backend, so the package works without it.

Models: an HF id, a local HF folder, or a GGUF file (a packaged alias such as ``smollm2-135m``
resolves to one); for a GGUF, vLLM needs a tokenizer: ``generate.tokenizer`` (an HF folder or id),
else the tokenizer stored in the GGUF itself.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..models import resolve_model
from .base import Generation, GenerationBackend, cut_at_newline, query_tokens

if TYPE_CHECKING:  # pragma: no cover
    from ..config import GenerateConfig

INSTALL_HINT = (
    "the vllm backend needs an NVIDIA GPU and the vllm package: run it in the CUDA image "
    "(REGISTRY/inpars:cuda, or `pip install inpars[vllm]` on a CUDA machine), or use generate.backend=transformers"
)


class VLLMBackend(GenerationBackend):
    """Queries from ``vllm.LLM`` with prefix caching; greedy by default."""

    name = "vllm"
    install_hint = INSTALL_HINT

    def __init__(
        self,
        model: str = "smollm2-135m",
        *,
        dtype: str = "auto",
        tokenizer: str | None = None,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
    ):
        if not self.is_available():
            raise ConfigError(INSTALL_HINT)
        from vllm import LLM

        self.source = resolve_model(model)
        if self.source.gguf_file:
            target = str(Path(self.source.name_or_path) / self.source.gguf_file)
            # vLLM reads the tokenizer out of the GGUF when no HF tokenizer is named.
            tokenizer = tokenizer or target
        else:
            target = self.source.name_or_path
        kwargs = {"max_model_len": max_model_len} if max_model_len else {}
        self.llm = LLM(
            model=target,
            tokenizer=tokenizer,
            dtype={"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(dtype, "auto"),
            enable_prefix_caching=True,  # the few-shot prefix is computed once and reused
            gpu_memory_utilization=gpu_memory_utilization,
            **kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()

    @classmethod
    def from_config(cls, config: GenerateConfig) -> VLLMBackend:
        return cls(config.model, dtype=config.dtype, tokenizer=getattr(config, "tokenizer", None))

    @classmethod
    def is_available(cls) -> bool:
        """vllm importable and a CUDA GPU visible (checked without importing vllm)."""
        if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("torch") is None:
            return False
        import torch

        return torch.cuda.is_available()

    @property
    def model_identity(self) -> str:
        return self.source.identity

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= max_tokens else self.tokenizer.decode(ids[:max_tokens]).rstrip()

    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        prefix: str | None = None,  # prefix caching finds shared prefixes by itself
    ) -> list[Generation]:
        from vllm import SamplingParams

        if not prompts:
            return []
        params = SamplingParams(
            temperature=float(temperature),  # 0: greedy
            top_p=float(top_p) if temperature > 0 else 1.0,
            max_tokens=max_new_tokens,
            stop=["\n"],  # a query is one line
            logprobs=1,  # the sampled token's log-prob is always in the dict
            seed=seed,
        )
        outputs = self.llm.generate(prompts, params, use_tqdm=False)  # in input order
        return [self._to_generation(out) for out in outputs]

    def _to_generation(self, out) -> Generation:
        comp = out.outputs[0]
        ids = list(comp.token_ids)
        tokens, values = [], []
        for token_id, entry in zip(ids, comp.logprobs or []):
            logprob = entry[token_id]
            tokens.append(logprob.decoded_token if logprob.decoded_token is not None else self.tokenizer.decode([token_id]))
            values.append(logprob.logprob)
        query, cut = cut_at_newline(comp.text)
        q_tokens, q_values = query_tokens(tokens, values)
        return Generation(
            text=query.strip(),
            tokens=q_tokens,
            log_probs=q_values,
            prompt_tokens=len(out.prompt_token_ids or []),
            completion_tokens=len(ids),
            finish_reason="length" if comp.finish_reason == "length" and not cut else "stop",
        )

    def close(self) -> None:
        self.llm = None
