"""Prompt templates: YAML files that turn a document into the text a language model completes.

Two kinds of template (``mode`` in the YAML):

- ``static``: fixed few-shot examples written in the file (InPars vanilla, InPars GBQ). Every prompt
  starts with the same text, which :attr:`PromptText.prefix` exposes so a backend can compute it once.
- ``dynamic``: Promptagator style. The examples are (query, document) pairs drawn *per document* from
  a user-given JSONL file, with a random generator seeded by ``(seed, doc_id)``: a document's prompt
  never depends on how the corpus was sharded or batched. The source document itself is never one of
  its own examples.

Documents (and example documents) are truncated by *tokens* through the backend's ``truncate``, so
the prompt fits the model whatever the tokenizer.

>>> prompt = load_prompt("inpars")
>>> prompt.build(doc, truncate=backend.truncate).text  # doctest: +SKIP
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..corpus import Document, iter_jsonl
from ..errors import ConfigError, InputError

TEMPLATES_DIR = Path(__file__).parent / "templates"
DEFAULT_N_EXAMPLES = 3

Truncate = Callable[[str, int], str]


@dataclass
class PromptText:
    """One built prompt."""

    text: str  # the full prompt; the model continues it with the query
    fewshot_examples: list[dict] = field(default_factory=list)  # [{"query_id", "query", "doc_id"}]
    prefix: str = ""  # the start that every prompt of this template shares (for KV-cache reuse)


@dataclass(frozen=True)
class FewShotExample:
    query_id: str | None
    query: str
    doc_id: str | None
    document: str
    extra: tuple[tuple[str, str], ...] = ()  # other template fields, e.g. GBQ's bad_query

    def record(self) -> dict:
        """What an output row records about this example."""
        return {"query_id": self.query_id, "query": self.query, "doc_id": self.doc_id}


def _one_line(text: str) -> str:
    # The templates are line-based ("Document: ...\nRelevant Query: ..."): a newline inside a document
    # would look like the end of a field, and the generated query ends at the first newline.
    return " ".join(text.split())


@dataclass
class Prompt:
    """A loaded template; :meth:`build` makes the prompt for one document."""

    name: str
    mode: str  # "static" | "dynamic"
    instruction: str
    example_template: str
    target_template: str
    examples: list[FewShotExample]  # static: the fixed examples; dynamic: the pool to draw from
    n_examples: int = DEFAULT_N_EXAMPLES
    source: str = ""  # the YAML file it came from

    def build(
        self,
        doc: Document,
        *,
        truncate: Truncate,
        max_doc_tokens: int = 256,
        max_example_tokens: int = 128,
        seed: int = 0,
    ) -> PromptText:
        """The prompt for ``doc``: instruction, few-shot examples, then the (truncated) document."""
        if self.mode == "static":
            chosen = self.examples
            examples = "".join(self._example(i, ex, None, 0) for i, ex in enumerate(chosen, 1))
        else:
            chosen = self.draw_examples(doc.doc_id, seed)
            examples = "".join(self._example(i, ex, truncate, max_example_tokens) for i, ex in enumerate(chosen, 1))
        document = truncate(_one_line(doc.contents), max_doc_tokens)
        target = self.target_template.format(n=len(chosen) + 1, document=document)
        text = self.instruction + examples + target
        if self.mode == "static":
            # Everything up to the document is the same for every document.
            head = self.target_template.split("{document}", 1)[0].format(n=len(chosen) + 1)
            prefix = self.instruction + examples + head
        else:
            prefix = self.instruction
        return PromptText(text=text, fewshot_examples=[ex.record() for ex in chosen], prefix=prefix)

    def draw_examples(self, doc_id: str, seed: int) -> list[FewShotExample]:
        """The dynamic examples of ``doc_id``: seeded by ``(seed, doc_id)``, never the document itself."""
        pool = [ex for ex in self.examples if ex.doc_id != doc_id]
        # A string seed is hashed with SHA-512 by `random`, so this is stable across runs and machines.
        rng = random.Random(f"{seed}:{doc_id}")
        return rng.sample(pool, min(self.n_examples, len(pool)))

    def _example(self, n: int, ex: FewShotExample, truncate: Truncate | None, max_tokens: int) -> str:
        if truncate is None:  # static examples are used verbatim, as their template file wrote them
            return self.example_template.format(n=n, document=ex.document, query=ex.query, **dict(ex.extra))
        document = truncate(_one_line(ex.document), max_tokens)
        return self.example_template.format(n=n, document=document, query=_one_line(ex.query), **dict(ex.extra))


def known_prompts() -> list[str]:
    """The packaged template names (plus ``promptagator-<dataset>`` for any dataset)."""
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.yaml"))


def load_prompt(name: str, fewshot_file: str | None = None, n_examples: int = DEFAULT_N_EXAMPLES) -> Prompt:
    """Load a packaged template by name (``inpars``, ``inpars-gbq``, ``promptagator-<dataset>``) or a YAML path.

    ``promptagator-<dataset>`` without a template of its own uses the generic ``promptagator.yaml``.
    Dynamic (Promptagator) prompts need ``fewshot_file``: JSONL rows with ``query_id``, ``query``,
    ``doc_id``, ``title``, ``text``.
    """
    path = template_path(name)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"prompt template {path}: not valid YAML ({e})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"prompt template {path}: expected a mapping")
    mode = spec.get("mode", "static")
    if mode not in ("static", "dynamic"):
        raise ConfigError(f"prompt template {path}: mode must be 'static' or 'dynamic', got {mode!r}")
    for key in ("example_template", "target_template"):
        if not isinstance(spec.get(key), str) or "{document}" not in spec[key]:
            raise ConfigError(f"prompt template {path}: {key} must be a string containing {{document}}")
    is_packaged = path.parent == TEMPLATES_DIR
    prompt_name = name if is_packaged else str(spec.get("name") or path.stem)
    if mode == "static":
        examples = [_static_example(e, path, i) for i, e in enumerate(spec.get("examples") or [], 1)]
    else:
        if not fewshot_file:
            raise ConfigError(f"prompt {prompt_name!r} draws its examples from a file: set generate.fewshot_file")
        examples = read_fewshot(fewshot_file)
        if n_examples < 1:
            raise ConfigError(f"n_examples must be >= 1, got {n_examples}")
    return Prompt(
        name=prompt_name,
        mode=mode,
        instruction=str(spec.get("instruction") or ""),
        example_template=spec["example_template"],
        target_template=spec["target_template"],
        examples=examples,
        n_examples=n_examples,
        source=str(path),
    )


def template_path(name: str) -> Path:
    """The YAML template a prompt name means (a packaged name or a path); unknown names are a ConfigError."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"prompt template file {name!r} not found")
        return path
    if (TEMPLATES_DIR / f"{name}.yaml").is_file():
        return TEMPLATES_DIR / f"{name}.yaml"
    if name.startswith("promptagator-") and len(name) > len("promptagator-"):
        return TEMPLATES_DIR / "promptagator.yaml"
    raise ConfigError(
        f"unknown prompt {name!r}; known: {', '.join(known_prompts())}, promptagator-<dataset>, or a path to a .yaml template"
    )


def _static_example(entry: Any, path: Path, i: int) -> FewShotExample:
    if not isinstance(entry, dict) or not entry.get("document") or not entry.get("query"):
        raise ConfigError(f"prompt template {path}: example {i} needs 'document' and 'query'")
    extra = tuple((k, str(v)) for k, v in entry.items() if k not in ("document", "query", "query_id", "doc_id"))
    qid, did = entry.get("query_id"), entry.get("doc_id")
    return FewShotExample(
        None if qid is None else str(qid), str(entry["query"]), None if did is None else str(did), str(entry["document"]), extra
    )


def read_fewshot(path: str) -> list[FewShotExample]:
    """The (query, document) pairs of a few-shot file; a bad row raises naming ``path:line``."""
    if not Path(path).is_file():
        raise InputError("few-shot file not found", path=str(path))
    examples = []
    for lineno, obj in iter_jsonl(path):
        query, doc_id = obj.get("query"), obj.get("doc_id")
        title, text = obj.get("title") or "", obj.get("text") or obj.get("contents") or ""
        if not isinstance(query, str) or not query.strip():
            raise InputError("few-shot row needs a non-empty 'query'", path=str(path), line=lineno)
        if doc_id is None or str(doc_id).strip() == "":
            raise InputError("few-shot row needs a 'doc_id'", path=str(path), line=lineno)
        if not isinstance(title, str) or not isinstance(text, str) or not (title.strip() or text.strip()):
            raise InputError("few-shot row needs a document 'text' (and optional 'title')", path=str(path), line=lineno)
        qid = obj.get("query_id")
        document = Document(str(doc_id), title.strip(), text.strip()).contents
        examples.append(FewShotExample(None if qid is None else str(qid), query.strip(), str(doc_id), document))
    if not examples:
        raise InputError("few-shot file has no rows", path=str(path))
    return examples


__all__ = ["FewShotExample", "Prompt", "PromptText", "known_prompts", "load_prompt", "read_fewshot", "template_path"]
