"""Training a reranker on synthetic (query, positive, negatives) groups.

One loop, three model families (:mod:`inpars.encoding` holds how each reads its input and scores):

* ``cross-encoder`` — ``AutoModelForSequenceClassification(num_labels=1)`` from any HF id, local path
  or packaged alias. ``bce``: pointwise, (q, pos) -> 1 and (q, neg) -> 0. ``lce``: a softmax over each
  group [positive, negatives...] with the positive as the target (InPars-light).
* ``monot5`` — T5 seq2seq reading ``Query: q Document: d Relevant:``. ``bce``: the usual seq2seq
  cross-entropy on the target word (``true`` / ``false``) at the first decoder step. ``lce``: a group
  softmax over each pair's monoT5 score, log P(true | {true, false}) — the very score used at ranking.
* ``bi-encoder`` — ``AutoModel`` + mean pooling, unit vectors, cosine / 0.05 (i.e. x20) and a softmax
  over every document in the batch: the query's positive, its hard negatives and everyone else's
  documents (in-batch negatives).

``auto`` (the default) trains the starting checkpoint as what it already is
(:func:`inpars.encoding.guess_model_type`): a sentence-embedding model such as the packaged
all-MiniLM-L6-v2 stays a bi-encoder, a T5 checkpoint is trained as monoT5, anything else (a
classification checkpoint, a masked LM) as a cross-encoder. What each choice gave on SciFact (BCE
against LCE, a fresh head on a retriever) is measured in the README ("Which loss, which model type").

The output folder is a standard HF model folder (``save_pretrained`` of model and tokenizer) plus
``inpars_model.json`` so :func:`inpars.rerank.load_reranker` knows how to score it, plus what
sentence-transformers needs to load it as it is (:mod:`inpars.model_formats`: a bi-encoder loads with
``SentenceTransformer(folder)``, a cross-encoder with ``CrossEncoder(folder)``; a monoT5 folder is what
the InPars toolkit's reranker loads).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .corpus import Document
from .devices import resolve_device, resolve_dtype
from .encoding import (
    METADATA_FILE,
    MODEL_TYPES,
    attention_backends,
    collate,
    encode_pairs,
    encode_texts,
    guess_model_type,
    load_pretrained,
    mean_pool,
    monot5_scores,
    pad_multiple,
    relevance_token_ids,
)
from .errors import ConfigError, InputError
from .models import resolve_model

log = logging.getLogger(__name__)

LOSSES = ("bce", "lce")
BI_ENCODER_SCALE = 20.0  # cosine / temperature 0.05
WARMUP_FRACTION = 0.1  # of the total steps, linear warmup then linear decay to 0
MAX_GRAD_NORM = 1.0


def default_learning_rate(model_type: str) -> float:
    """monoT5 is fine-tuned at 3e-4 (as in the monoT5/InPars papers); BERT-like encoders at 3e-5."""
    return 3e-4 if model_type == "monot5" else 3e-5


def split_held_out(triples: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)``: a stable hash-chosen share ``fraction`` of the synthetic queries kept out of
    training (the fusion weight is chosen on them). The choice depends on the query id only, so a query
    is held out whatever else is in the list (another filter's rows, another shard count)."""
    if fraction <= 0:
        return list(triples), []
    train, held = [], []
    for t in triples:
        h = int(hashlib.sha1(str(t["query_id"]).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if h < fraction else train).append(t)
    return train, held


def _check_examples(examples: Sequence[Mapping], docs: Mapping[str, Document]) -> list[tuple[str, str, list[str]]]:
    """(query, pos_doc_id, neg_doc_ids) per row; a missing field or unknown doc id raises naming the query."""
    groups = []
    for n, row in enumerate(examples, 1):
        qid = row.get("query_id", f"#{n}")
        query, pos, negs = row.get("query"), row.get("pos_doc_id"), row.get("neg_doc_ids")
        if not isinstance(query, str) or not query.strip() or pos is None or not isinstance(negs, list):
            raise InputError(f"training row {qid!r} (row {n}) needs query, pos_doc_id and a neg_doc_ids list")
        for did in [pos, *negs]:
            if did not in docs:
                raise InputError(f"training row {qid!r}: document id {did!r} is not in the corpus")
        groups.append((query, str(pos), [str(d) for d in negs]))
    if not groups:
        raise InputError("no training examples")
    return groups


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass


def _load(model_type: str, name_or_path: str) -> tuple[Any, Any, set[str]]:
    """The model in fp32, its tokenizer, and the names of the weights the checkpoint did not have."""
    model, tokenizer, fresh = load_pretrained(model_type, name_or_path)
    # Master weights stay fp32 whatever the compute dtype (autocast does the bf16 part).
    return model.float(), tokenizer, fresh


def snapshot_weights(model: Any, fresh: set[str]) -> dict[str, torch.Tensor]:
    """A CPU copy of the checkpoint's own weights (freshly initialised ones are not worth returning to)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k not in fresh and v.is_floating_point()}


def _check_keep_initial(keep_initial: float) -> None:
    if not 0.0 <= keep_initial <= 1.0:
        raise ConfigError(f"train.keep_initial must be in [0, 1], got {keep_initial}")


@torch.no_grad()
def interpolate_weights(model: Any, initial: Mapping[str, torch.Tensor], keep_initial: float) -> int:
    """WiSE-FT (Wortsman et al., 2022): ``w = (1 - a) * trained + a * initial`` for every weight in
    ``initial``; returns how many tensors were mixed."""
    _check_keep_initial(keep_initial)
    state = model.state_dict()
    done: set[int] = set()  # tied weights (T5's shared embeddings) appear under several names: mix once
    for name, start in initial.items():
        target = state[name]
        if target.data_ptr() in done:
            continue
        done.add(target.data_ptr())
        target.lerp_(start.to(target.device, target.dtype), keep_initial)
    return len(done)


class _Objective:
    """Turns a batch of groups into a scalar loss for one model family and loss."""

    def __init__(
        self,
        model_type: str,
        loss: str,
        model: Any,
        tokenizer: Any,
        docs: Mapping[str, Document],
        max_length: int,
        device: torch.device,
        relevance_tokens: Sequence[str],
    ):
        self.model_type, self.loss, self.model, self.tokenizer = model_type, loss, model, tokenizer
        self.docs, self.max_length, self.device = docs, max_length, device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.multiple = pad_multiple(device, max_length)
        if model_type == "monot5":
            self.true_id, self.false_id = relevance_token_ids(tokenizer, relevance_tokens)
            self.start_id = model.config.decoder_start_token_id

    def __call__(self, batch: Sequence[tuple[str, str, list[str]]]) -> torch.Tensor:
        if self.model_type == "bi-encoder":
            return self._bi_encoder(batch)
        queries, texts, sizes = [], [], []
        for query, pos, negs in batch:
            for did in [pos, *negs]:
                queries.append(query)
                texts.append(self.docs[did].contents)
            sizes.append(1 + len(negs))
        inputs = collate(
            encode_pairs(self.tokenizer, self.model_type, queries, texts, self.max_length), self.pad_id, self.device, self.multiple
        )
        labels = torch.tensor([1.0 if j == 0 else 0.0 for n in sizes for j in range(n)], device=self.device)
        if self.model_type == "cross-encoder":
            scores = self.model(**inputs).logits[:, 0].float()
            if self.loss == "bce":
                return torch.nn.functional.binary_cross_entropy_with_logits(scores, labels)
            return _group_softmax_loss(scores, sizes)
        dec = torch.full((inputs["input_ids"].shape[0], 1), self.start_id, dtype=torch.long, device=self.device)
        logits = self.model(**inputs, decoder_input_ids=dec).logits
        if self.loss == "bce":
            targets = torch.where(labels > 0, self.true_id, self.false_id).long()
            return torch.nn.functional.cross_entropy(logits[:, 0].float(), targets)
        return _group_softmax_loss(monot5_scores(logits, self.true_id, self.false_id), sizes)

    def _embed(self, texts: list[str]) -> torch.Tensor:
        inputs = collate(encode_texts(self.tokenizer, texts, self.max_length), self.pad_id, self.device, self.multiple)
        hidden = self.model(**inputs).last_hidden_state.float()
        return torch.nn.functional.normalize(mean_pool(hidden, inputs["attention_mask"]), dim=-1)

    def _bi_encoder(self, batch: Sequence[tuple[str, str, list[str]]]) -> torch.Tensor:
        doc_ids = [did for _, pos, negs in batch for did in [pos, *negs]]
        targets, col = [], 0
        for _, _, negs in batch:
            targets.append(col)
            col += 1 + len(negs)
        q = self._embed([query for query, _, _ in batch])
        d = self._embed([self.docs[did].contents for did in doc_ids])
        sims = BI_ENCODER_SCALE * q @ d.T
        # A document that is another query's positive may be this query's positive too (two queries
        # generated from one document): it must not count as a negative.
        same = torch.tensor(
            [[doc_ids[c] == pos and c != targets[i] for c in range(len(doc_ids))] for i, (_, pos, _) in enumerate(batch)],
            device=sims.device,
        )
        sims = sims.masked_fill(same, float("-inf"))
        return torch.nn.functional.cross_entropy(sims, torch.tensor(targets, device=sims.device))


def _group_softmax_loss(scores: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Cross-entropy of a softmax over each group's scores, the positive (index 0) as target."""
    losses = [-torch.log_softmax(group, dim=0)[0] for group in torch.split(scores, list(sizes))]
    return torch.stack(losses).mean()


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_model_type(model_type: str, name_or_path: str) -> str:
    """``model_type`` itself, or for ``auto`` what the starting checkpoint already is."""
    return guess_model_type(name_or_path) if model_type == "auto" else model_type


def train_model(
    examples: Sequence[Mapping],
    docs: Mapping[str, Document],
    config: TrainConfig,
    output_dir: str | Path,
    *,
    on_progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Train ``config.model_type`` (``auto``: see the module docstring) on negatives rows and save it to ``output_dir``; returns stats.

    ``examples`` are rows ``{"query_id", "query", "pos_doc_id", "neg_doc_ids": [...]}`` (the negatives
    stage's output); ``config.batch_size`` counts groups (queries). The schedule is
    ``max_steps`` if set, else ``ceil(epochs * len(examples) / batch_size)`` steps; the examples are
    reshuffled each epoch from ``config.seed``, so a CPU run is reproducible bit for bit.
    """
    if config.model_type not in ("auto", *MODEL_TYPES):
        raise ConfigError(f"unknown train.model_type {config.model_type!r} (one of auto, {', '.join(MODEL_TYPES)})")
    if config.loss not in LOSSES:
        raise ConfigError(f"unknown train.loss {config.loss!r} (one of {', '.join(LOSSES)})")
    _check_keep_initial(config.keep_initial)  # before training, not after it
    if config.batch_size < 1:
        raise ConfigError(f"train.batch_size must be >= 1, got {config.batch_size}")
    groups = _check_examples(examples, docs)
    output_dir = Path(output_dir)
    source = resolve_model(config.model)
    # Everything below, the stats and the saved metadata see the resolved type, never "auto".
    config = config.model_copy(update={"model_type": resolve_model_type(config.model_type, source.name_or_path)})
    log.info("training %s as a %s", source.identity, config.model_type)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    lr = config.learning_rate if config.learning_rate is not None else default_learning_rate(config.model_type)
    steps_per_epoch = math.ceil(len(groups) / config.batch_size)
    total = config.max_steps if config.max_steps is not None else math.ceil(config.epochs * steps_per_epoch)
    if total < 1:
        raise ConfigError(f"nothing to train: {total} steps (epochs={config.epochs}, max_steps={config.max_steps})")

    _seed_everything(config.seed)
    model, tokenizer, fresh = _load(config.model_type, source.name_or_path)
    initial = snapshot_weights(model, fresh) if config.keep_initial > 0 else None
    model.to(device).train()
    objective = _Objective(config.model_type, config.loss, model, tokenizer, docs, config.max_length, device, config.relevance_tokens)

    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(WARMUP_FRACTION * total), total)
    xm = _xla_model() if device.type == "xla" else None
    rng = random.Random(config.seed)

    def batches():
        while True:  # epoch after epoch, each its own deterministic shuffle
            order = list(range(len(groups)))
            rng.shuffle(order)
            for s in range(0, len(order), config.batch_size):
                yield [groups[i] for i in order[s : s + config.batch_size]]

    from tqdm.auto import tqdm

    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(total=total, desc=f"train {config.model_type}", unit="step", disable=None)
    for step, batch in zip(range(1, total + 1), batches()):
        with attention_backends(device):
            with _autocast(device, dtype):  # the forward in bf16; backward outside autocast, as advised
                loss = objective(batch)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        if xm is not None:
            xm.optimizer_step(optimizer)  # also marks the XLA step, so the graph runs
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach().cpu())
        if not math.isfinite(value):
            raise ConfigError(f"training diverged at step {step} (loss {value}); lower train.learning_rate")
        losses.append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}")
        if on_progress is not None:
            on_progress(step, total, value)
    bar.close()
    seconds = time.perf_counter() - started
    if initial is not None:
        interpolate_weights(model, initial, config.keep_initial)

    stats = {
        "model_type": config.model_type,
        "base_model": source.identity,
        "loss": config.loss,
        "examples": len(groups),
        "steps": total,
        "epochs": total / steps_per_epoch,
        "batch_size": config.batch_size,
        "learning_rate": lr,
        "keep_initial": config.keep_initial,
        "final_loss": losses[-1],
        "loss_curve": _curve(losses),
        "seconds": round(seconds, 3),
        "steps_per_second": round(total / seconds, 4) if seconds > 0 else None,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "seed": config.seed,
    }
    _save(model, tokenizer, config, source.identity, stats, output_dir)
    return stats


def _curve(losses: list[float], points: int = 10) -> dict[str, Any]:
    """A short summary of the loss curve: first/last, and the mean of ``points`` equal windows."""
    n, k = len(losses), min(points, len(losses))
    windows = [losses[i * n // k : (i + 1) * n // k] for i in range(k)]
    return {
        "first": losses[0],
        "last": losses[-1],
        "min": min(losses),
        "window_means": [round(sum(w) / len(w), 5) for w in windows],
    }


def _save(model: Any, tokenizer: Any, config: TrainConfig, base: str, stats: dict, output_dir: Path) -> None:
    from .model_formats import bound_tokenizer_length, write_model_formats

    output_dir.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(output_dir)  # from an XLA/GPU device too: saving reads CPU tensors
    bound_tokenizer_length(tokenizer, config.max_length)
    tokenizer.save_pretrained(output_dir)
    # The files sentence-transformers / the InPars toolkit load the folder with (see inpars.model_formats).
    formats = write_model_formats(
        output_dir,
        config.model_type,
        hidden_size=getattr(model.config, "hidden_size", 0),
        max_length=config.max_length,
        relevance_tokens=config.relevance_tokens,
    )
    if formats["warning"]:
        log.warning("%s: %s", output_dir, formats["warning"])
    meta = {
        "model_type": config.model_type,
        "relevance_tokens": list(config.relevance_tokens) if config.model_type == "monot5" else None,
        "max_length": config.max_length,
        "base_model": base,
        "loss": config.loss,
        "pooling": "mean" if config.model_type == "bi-encoder" else None,
        "similarity": "cosine" if config.model_type == "bi-encoder" else None,
        "training": {k: stats[k] for k in ("examples", "steps", "learning_rate", "batch_size", "seed", "keep_initial", "final_loss")},
        **formats,
    }
    (output_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _xla_model():
    import torch_xla.core.xla_model as xm  # type: ignore[import-not-found]

    return xm
