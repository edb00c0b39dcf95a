"""InPars: synthetic queries from a language model -> filtered -> BM25 negatives -> trained reranker."""

__version__ = "0.1.0"
