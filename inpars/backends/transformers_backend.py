"""Local generation with Hugging Face transformers: any causal LM by hub id, local path or packaged GGUF.

Why a decode loop of our own instead of ``model.generate``: every prompt of a run starts with the same
few-shot text. We run that shared prefix through the model once, keep its KV cache, and for each batch
feed only the per-document suffixes on top of it (left-padded *after* the prefix, with an explicit
attention mask and position ids, so each row sees exactly the tokens of its full prompt). Rows that
reach their newline leave the batch at once. Prompts are sorted by length into batches to cut padding.
Greedy results equal batch-1 ``generate`` on the full prompt up to floating-point rounding (exact in
fp32 on the tests' documents).

Packaged GGUF models (e.g. ``smollm2-135m``) are dequantized by transformers (~15 s); we keep a
safetensors copy under ``$INPARS_CACHE`` (default ``~/.cache/inpars``) keyed by the GGUF's content, so
later loads take a second or two.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..devices import resolve_device, resolve_dtype
from ..errors import ConfigError
from ..files import file_sha256
from ..models import ModelSource, resolve_model
from ..storage import cache_root
from .base import Generation, GenerationBackend

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..config import GenerateConfig


# --------------------------------------------------------------------------- loading


def gguf_cache_dir(source: ModelSource) -> Path:
    """The cache folder of a GGUF model's converted copy, keyed by the file's sha256 (0.1-0.4 s for
    these files): reinstalling the same package reuses the conversion, where an mtime key left a new
    ~0.5 GB copy per install, and a changed file never meets a stale conversion."""
    gguf = Path(source.name_or_path) / str(source.gguf_file)
    return cache_root() / "gguf" / f"{gguf.stem}-{file_sha256(gguf, block=1 << 22)[:16]}"


def _load_gguf(source: ModelSource):
    """Tokenizer and fp32 model from a GGUF file, via a cached safetensors conversion."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = gguf_cache_dir(source)
    if (cached / "model.safetensors").is_file() and (cached / "config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(cached), AutoModelForCausalLM.from_pretrained(cached)
        except (OSError, ValueError):  # a broken cache entry: rebuild it below
            pass
    tokenizer = AutoTokenizer.from_pretrained(source.name_or_path, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.name_or_path, gguf_file=source.gguf_file)
    try:
        _save_converted(model, tokenizer, cached)
    except OSError:
        pass  # a read-only cache only costs the conversion time next run
    return tokenizer, model


def _save_converted(model, tokenizer, target: Path) -> None:
    # model.save_pretrained() fails on GGUF-loaded models, so write config + weights ourselves.
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embeddings; safetensors rejects shared tensors
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    try:
        os.replace(tmp, target)  # atomic; a concurrent writer's copy is just as good
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def load_model(source: ModelSource, dtype: torch.dtype, device: str):
    """``(tokenizer, model)`` in eval mode on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if source.gguf_file:
            tokenizer, model = _load_gguf(source)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source.name_or_path)
            model = AutoModelForCausalLM.from_pretrained(source.name_or_path, dtype=dtype)
    except OSError as e:
        raise ConfigError(f"cannot load model {source.identity!r}: {e}") from e
    model = model.to(device=device, dtype=dtype).eval()
    return tokenizer, model


# --------------------------------------------------------------------------- the backend


class TransformersBackend(GenerationBackend):
    """Batched greedy/sampled generation with a shared-prefix KV cache (see the module docstring)."""

    name = "transformers"

    def __init__(
        self,
        model: str = "smollm2-135m",
        *,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 16,
        prefix_cache: bool = True,
    ):

        self.source = resolve_model(model)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = max(1, int(batch_size))
        self.tokenizer, self.model = load_model(self.source, self.dtype, self.device)
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self._prefix_cache = prefix_cache and self._plain_cache()
        self._prefix: tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self.pad_id = next(i for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0) if i is not None)
        self.stop_ids = self._eos_ids()
        self.newline_ids, self.newline_kept = self._newline_tokens()
        # Work actually done (padding included), for the benchmark's compute-bound figure.
        self.stats = {"forward_tokens": 0, "logit_rows": 0}

    @classmethod
    def from_config(cls, config: GenerateConfig) -> TransformersBackend:
        return cls(config.model, dtype=config.dtype, device=config.device, batch_size=config.batch_size)

    @classmethod
    def is_available(cls) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))

    @property
    def model_identity(self) -> str:
        return self.source.identity

    @property
    def reuses_prefix(self) -> bool:
        """Whether the shared few-shot prefix's key/value cache is computed once and reused (off for
        sliding-window attention, where reusing it would change the results)."""
        return self._prefix_cache

    def forget_prefix(self) -> None:
        """Drop the cached prefix, so the next batch computes it again (benchmarks time that work)."""
        self._prefix = None

    def close(self) -> None:
        self.forget_prefix()
        self.model = None

    # ----------------------------------------------------------------- tokens

    def encode(self, text: str) -> list[int]:
        """Prompt ids exactly as ``tokenizer(text)`` makes them (what batch-1 ``generate`` would see)."""
        return list(self.tokenizer(text)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def truncate(self, text: str, max_tokens: int) -> str:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if len(ids) <= max_tokens:
            return text
        if max_tokens <= 0:
            return ""
        # Cut the original string at the end of the last kept token: the text stays as written.
        end = enc["offset_mapping"][max_tokens - 1][1]
        cut = text[:end]
        while cut and self.count_tokens(cut) > max_tokens:  # rare: re-tokenizing merged differently
            cut = cut[:-1]
        return cut.rstrip()

    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(int(i) for i in source)
        return ids

    def _newline_tokens(self) -> tuple[set[int], set[int]]:
        """Ids whose text holds a newline, taken from the tokenizer (never hard-coded).

        Returns ``(all, kept)``: ``kept`` are those with visible text before the newline (e.g. ``"?\\n"``),
        which stay part of the query; the others (``"\\n"``, ``"\\n\\n"``) end it and are dropped.
        """
        vocab = len(self.tokenizer)
        texts = self.tokenizer.batch_decode([[i] for i in range(vocab)])
        newline = {i for i, t in enumerate(texts) if "\n" in t}
        kept = {i for i in newline if texts[i].split("\n", 1)[0].strip()}
        return newline, kept

    # ----------------------------------------------------------------- generation

    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        prefix: str | None = None,
    ) -> list[Generation]:
        import torch

        if not prompts:
            return []
        ids = [self.encode(p) for p in prompts]
        shared = self._shared_prefix(ids, prefix)
        # Batches of similar length waste little on padding; results go back in input order.
        order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
        results: list[Generation | None] = [None] * len(prompts)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                gens = self._generate_batch(
                    [ids[i] for i in chunk], [prompts[i] for i in chunk], shared, max_new_tokens, temperature, top_p, seed
                )
                for i, g in zip(chunk, gens):
                    results[i] = g
        return results  # type: ignore[return-value]

    def _plain_cache(self) -> bool:
        # Prefix reuse copies per-layer K/V tensors; recurrent layers do not fit that. Nor do sliding-window
        # layers (Gemma 3): a row's left padding sits between the prefix and its suffix, and a window counts
        # cache slots, so a padded row would see fewer prefix tokens than in its batch-1 run.
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        try:
            layers = DynamicCache(config=self.model.config).layers
        except Exception:
            return False
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def _shared_prefix(self, ids: list[list[int]], prefix: str | None) -> list[int]:
        """The token ids every prompt of this call starts with (the hint's, else their common start)."""
        if not self._prefix_cache:
            return []
        if prefix:
            shared = self.encode(prefix)
        else:
            shared = ids[0]
            for row in ids[1:]:
                shared = shared[: _common_length(shared, row)]
        # The last prefix token may merge with the document's first word ("Document: " + "Foo"):
        # keep only what every prompt really shares, and leave each prompt at least one token to feed.
        n = min([_common_length(shared, row) for row in ids] + [len(row) - 1 for row in ids])
        return shared[: max(n, 0)] if n >= 8 else []  # tiny prefixes are not worth a cache

    def _prefix_kv(self, shared: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (keys, values) of ``shared``, computed once and reused while the prefix is unchanged."""
        import torch

        key = tuple(shared)
        if self._prefix is not None:
            cached, kv = self._prefix
            if cached == key:
                return kv
            if cached[: len(key)] == key:  # a shorter prefix of the cached one: slice it
                return [(k[:, :, : len(key)], v[:, :, : len(key)]) for k, v in kv]
        inp = torch.tensor([shared], device=self.device)
        out = self.model(input_ids=inp, use_cache=True, logits_to_keep=1)
        self._count(len(shared), 1)
        cache = _cache_of(out)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        self._prefix = (key, kv)
        return kv

    def _count(self, tokens: int, logit_rows: int) -> None:
        self.stats["forward_tokens"] += tokens
        self.stats["logit_rows"] += logit_rows

    def _generate_batch(self, rows, prompts, shared, max_new_tokens, temperature, top_p, seed) -> list[Generation]:
        import torch
        from transformers import DynamicCache

        B, L = len(rows), len(shared)
        suffixes = [row[L:] for row in rows]
        S = max(len(s) for s in suffixes)
        inp = torch.full((B, S), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L + S), dtype=torch.long)
        mask[:, :L] = 1
        for b, s in enumerate(suffixes):  # left-pad each suffix, *after* the shared prefix
            inp[b, S - len(s) :] = torch.tensor(s)
            mask[b, L + S - len(s) :] = 1
        position = (mask.cumsum(-1) - 1).clamp(min=0)[:, L:]
        inp, mask, position = inp.to(self.device), mask.to(self.device), position.to(self.device)
        cache = DynamicCache()
        if L:
            for i, (k, v) in enumerate(self._prefix_kv(shared)):
                cache.update(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), i)
        out = self.model(
            input_ids=inp, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache}
        )
        self._count(B * S, B)
        cache = _cache_of(out)
        logits = out.logits[:, -1, :].float()
        last = position[:, -1]

        samplers = None
        if temperature > 0:
            # One generator per prompt, seeded by (seed, prompt): a row's sample does not depend on
            # which other prompts share its batch, call or shard.
            samplers = [_generator(seed or 0, p) for p in prompts]

        tokens: list[list[int]] = [[] for _ in range(B)]
        logps: list[list[float]] = [[] for _ in range(B)]
        finish = ["length"] * B
        active = list(range(B))
        for step in range(max_new_tokens):
            logp = torch.log_softmax(logits, dim=-1)  # the model's own distribution, for filtering
            if samplers is None:
                nxt = logits.argmax(dim=-1)
            else:
                nxt = _sample(logits, temperature, top_p, [samplers[b] for b in active])
            chosen = logp.gather(1, nxt[:, None])[:, 0].tolist()
            keep = []
            for j, (b, t) in enumerate(zip(active, nxt.tolist())):
                if t in self.stop_ids or t in self.newline_ids:
                    if t in self.newline_kept:  # text before its newline belongs to the query
                        tokens[b].append(t)
                        logps[b].append(chosen[j])
                    finish[b] = "stop"
                    continue
                tokens[b].append(t)
                logps[b].append(chosen[j])
                keep.append(j)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(active):  # finished rows leave the batch
                idx = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(idx)
                mask, last, nxt = mask[idx], last[idx], nxt[idx]
                active = [active[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            last = last + 1
            out = self.model(
                input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], use_cache=True, **{self._cache_kw: cache}
            )
            self._count(len(active), len(active))
            cache = _cache_of(out)
            logits = out.logits[:, -1, :].float()

        gens = []
        for b in range(B):
            text = self.tokenizer.decode(tokens[b], skip_special_tokens=True).split("\n", 1)[0].strip()
            gens.append(
                Generation(
                    text=text,
                    tokens=self.tokenizer.convert_ids_to_tokens(tokens[b]),
                    log_probs=[min(0.0, x) for x in logps[b]],
                    prompt_tokens=len(rows[b]),
                    completion_tokens=len(tokens[b]),
                    finish_reason=finish[b],
                )
            )
        return gens


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _common_length(a, b) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _generator(seed: int, prompt: str):
    import torch

    digest = hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _sample(logits, temperature: float, top_p: float, generators) -> torch.Tensor:
    """Nucleus sampling: batched sort, then one draw per row with that row's own generator."""
    import torch

    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        keep = (probs.cumsum(-1) - probs) < top_p  # the smallest set reaching top_p
        k = int(keep.sum(-1).max())
        probs, order = probs[:, :k] * keep[:, :k], order[:, :k]
    else:
        order = None
    # Inverse-CDF draw with one uniform per row: the pick depends only on that row's distribution and
    # generator, not on how many candidates other rows of the batch kept.
    cdf = probs.double().cpu().cumsum(-1)
    picks = []
    for row, gen in zip(cdf, generators):
        u = float(torch.rand(1, generator=gen, dtype=torch.float64)) * float(row[-1])
        picks.append(min(int(torch.searchsorted(row, torch.tensor([u], dtype=torch.float64), right=True)), len(row) - 1))
    idx = torch.tensor(picks, device=logits.device)
    return idx if order is None else order.gather(1, idx[:, None])[:, 0]
