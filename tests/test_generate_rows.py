"""Generated rows stay bounded: long documents are cut (and say so) before the prompt and in ``doc_text``.

The backend here is a stand-in that needs no model (whitespace "tokens", a fixed query): what is under
test is what ``generate_queries`` hands to a backend and writes into rows, not generation itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from inpars.backends.base import Generation, GenerationBackend
from inpars.corpus import Document
from inpars.generate import DOC_TEXT_MAX_CHARS, bound_document, generate_queries
from inpars.prompts import load_prompt

REPO = Path(__file__).resolve().parents[1]


class WordBackend(GenerationBackend):
    """Whitespace tokens, a fixed two-word query; remembers the longest text it was asked to cut."""

    name = "words"

    def __init__(self):
        self.longest_truncated = 0

    @classmethod
    def from_config(cls, config):
        return cls()

    @property
    def model_identity(self) -> str:
        return "words"

    def generate(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, seed=None, prefix=None):
        return [Generation("what protein", ["what", "protein"], [-0.5, -0.25], len(p.split()), 2) for p in prompts]

    def truncate(self, text: str, max_tokens: int) -> str:
        self.longest_truncated = max(self.longest_truncated, len(text))
        return " ".join(text.split()[:max_tokens])

    def count_tokens(self, text: str) -> int:
        return len(text.split())


def test_bound_document_keeps_a_prefix_of_the_contents():
    short = Document("a", "Title", "some text")
    assert bound_document(short) == (short, False)
    long = Document("b", "A title", "word " * 10_000)
    cut, was_cut = bound_document(long, 1000)
    assert was_cut and cut.title == "A title" and cut.contents == long.contents[:1000]
    huge_title = Document("c", "t" * 2000, "text")
    cut, was_cut = bound_document(huge_title, 1000)
    assert was_cut and cut.contents == huge_title.contents[:1000]
    exact = Document("d", "", "x" * 1000)
    assert bound_document(exact, 1000) == (exact, False)


def test_rows_of_long_documents_are_cut_and_marked():
    backend = WordBackend()
    docs = [Document("short", "A title", "a short text about cells"), Document("long", "Long", "protein folding " * 5000)]
    rows = generate_queries(docs, backend, load_prompt("inpars"), max_doc_tokens=64)
    assert rows[0]["doc_text"] == docs[0].contents and "doc_text_truncated" not in rows[0]
    assert rows[1]["doc_text"] == docs[1].contents[:DOC_TEXT_MAX_CHARS] and rows[1]["doc_text_truncated"] is True
    assert list(rows[1])[:4] == ["query", "doc_id", "doc_text", "doc_text_truncated"]
    assert backend.longest_truncated <= DOC_TEXT_MAX_CHARS
    assert rows[0]["query"] == rows[1]["query"] == "what protein"


def test_a_50_mb_document_gives_a_small_row_and_a_small_process(tmp_path):
    """Through the document store, as a worker reads it; in a fresh process so its peak RSS is its own."""
    script = textwrap.dedent(
        f"""
        import json, resource, sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})

        def peak_rss_mb():
            # VmHWM is this process image's own peak; ru_maxrss would include the parent's RSS at
            # fork/exec (Linux keeps it across execve), i.e. pytest's.
            status = Path("/proc/self/status")
            if status.exists():
                line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
                return int(line.split()[1]) / 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        from test_generate_rows import WordBackend
        from inpars.corpus import Document
        from inpars.generate import generate_queries
        from inpars.prompts import load_prompt
        from inpars.store import DocumentStore, write_store

        words = ("protein", "folding", "cell", "membrane", "kinase", "tumour", "growth")
        big = " ".join(words[i % 7] for i in range(7_000_000))  # ~51 MB
        docs = [Document("small", "", "a small document"), Document("big", "Huge", big)]
        del big
        write_store(docs, {str(tmp_path)!r})
        del docs
        store = DocumentStore.open({str(tmp_path)!r})
        backend = WordBackend()
        rows = generate_queries(store.documents([1, 0]), backend, load_prompt("inpars"), max_doc_tokens=256)
        print(json.dumps({{
            "row_bytes": [len(json.dumps(r)) for r in rows],
            "truncated": [r.get("doc_text_truncated", False) for r in rows],
            "stored_chars": store.info.columns["text"]["max_chars"],
            "longest_truncated": backend.longest_truncated,
            "peak_rss_mb": peak_rss_mb(),
        }}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["stored_chars"] > 50_000_000  # the store holds the whole document
    assert result["truncated"] == [True, False]
    assert result["row_bytes"][0] < 3 * DOC_TEXT_MAX_CHARS  # not 50 MB
    assert result["longest_truncated"] <= DOC_TEXT_MAX_CHARS  # the tokenizer never sees it whole
    # About 240 MB here, writing the store included; the same run without the bound peaks near 820 MB
    # with this whitespace tokenizer (the issue saw 5.85 GB with a real one).
    assert result["peak_rss_mb"] < 512, result
