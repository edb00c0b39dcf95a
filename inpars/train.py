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
import dataclasses
import hashlib
import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import preemption
from .checkpoints import TrainCheckpointer
from .config import TrainConfig
from .corpus import Document
from .devices import auto_device_name, device_count, resolve_device, resolve_dtype
from .distributed import (
    LaunchPlan,
    World,
    any_rank,
    batch_sharder,
    enable_spmd,
    gather_objects,
    gather_rows,
    init_process_group,
    launch_plan,
    local_device,
    loss_scale,
    run_training,
    share,
    xla_step,
)
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
from .errors import ConfigError, InputError, Preempted
from .models import resolve_model

log = logging.getLogger(__name__)

LOSSES = ("bce", "lce")
BI_ENCODER_SCALE = 20.0  # cosine / temperature 0.05
WARMUP_FRACTION = 0.1  # of the total steps, linear warmup then linear decay to 0
MAX_GRAD_NORM = 1.0


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


def default_learning_rate(model_type: str) -> float:
    """monoT5 is fine-tuned at 3e-4 (as in the monoT5/InPars papers); BERT-like encoders at 3e-5."""
    return 3e-4 if model_type == "monot5" else 3e-5


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
    """Turns a batch of groups into a summed loss for one model family and loss.

    :meth:`loss_sum` sums over *units* (:meth:`units`: groups for ``lce`` and the bi-encoder, pairs
    for ``bce``); the loop scales it by ``world size / units of the global batch``, so one process
    and N DDP processes follow the same gradient (see :mod:`inpars.distributed`).
    """

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
        world: World = World(),
        shard: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    ):
        self.model_type, self.loss, self.model, self.tokenizer = model_type, loss, model, tokenizer
        self.docs, self.max_length, self.device = docs, max_length, device
        self.world, self.shard = world, shard
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.multiple = pad_multiple(device, max_length)
        if model_type == "monot5":
            config = model.module.config if hasattr(model, "module") else model.config
            self.true_id, self.false_id = relevance_token_ids(tokenizer, relevance_tokens)
            self.start_id = config.decoder_start_token_id

    def units(self, batch: Sequence[tuple[str, str, list[str]]]) -> int:
        if self.loss == "bce" and self.model_type != "bi-encoder":
            return sum(1 + len(negs) for _, _, negs in batch)
        return len(batch)

    def _inputs(self, encoded) -> dict[str, torch.Tensor]:
        inputs = collate(encoded, self.pad_id, self.device, self.multiple)
        return self.shard(inputs) if self.shard is not None else inputs

    def loss_sum(self, batch: Sequence[tuple[str, str, list[str]]], *, dummy: bool = False) -> torch.Tensor:
        """The loss summed over ``batch``'s units. ``dummy``: a rank with no share of this step's batch
        runs ``batch`` through the model for DDP's sake but contributes nothing (loss 0, no rows)."""
        if self.model_type == "bi-encoder":
            return self._bi_encoder(batch, dummy)
        queries, texts, sizes = [], [], []
        for query, pos, negs in batch:
            for did in [pos, *negs]:
                queries.append(query)
                texts.append(self.docs[did].contents)
            sizes.append(1 + len(negs))
        inputs = self._inputs(encode_pairs(self.tokenizer, self.model_type, queries, texts, self.max_length))
        labels = torch.tensor([1.0 if j == 0 else 0.0 for n in sizes for j in range(n)], device=self.device)
        if self.model_type == "cross-encoder":
            scores = self.model(**inputs).logits[:, 0].float()
            if self.loss == "bce":
                total = torch.nn.functional.binary_cross_entropy_with_logits(scores, labels, reduction="sum")
            else:
                total = _group_softmax_loss(scores, sizes)
        else:
            dec = torch.full((inputs["input_ids"].shape[0], 1), self.start_id, dtype=torch.long, device=self.device)
            logits = self.model(**inputs, decoder_input_ids=dec).logits
            if self.loss == "bce":
                targets = torch.where(labels > 0, self.true_id, self.false_id).long()
                total = torch.nn.functional.cross_entropy(logits[:, 0].float(), targets, reduction="sum")
            else:
                total = _group_softmax_loss(monot5_scores(logits, self.true_id, self.false_id), sizes)
        return total * 0.0 if dummy else total

    def _embed(self, texts: list[str]) -> torch.Tensor:
        inputs = self._inputs(encode_texts(self.tokenizer, texts, self.max_length))
        hidden = self.model(**inputs).last_hidden_state.float()
        return torch.nn.functional.normalize(mean_pool(hidden, inputs["attention_mask"]), dim=-1)

    def _bi_encoder(self, batch: Sequence[tuple[str, str, list[str]]], dummy: bool) -> torch.Tensor:
        doc_ids = [did for _, pos, negs in batch for did in [pos, *negs]]
        # Queries and documents in one forward: DDP expects one forward per backward.
        both = self._embed([query for query, _, _ in batch] + [self.docs[did].contents for did in doc_ids])
        q, d = both[: len(batch)], both[len(batch) :]
        if dummy:
            # Nothing of this rank's enters the other ranks' in-batch negatives, but the gather is in
            # the graph: its backward is a collective the other ranks wait for.
            d_none, _ = gather_rows(d[:0], self.world)
            gather_objects([], self.world)
            return (q.sum() + d.sum() + d_none.sum()) * 0.0
        # Every rank's documents are negatives for every query (as in one process over the global batch).
        d_all, offset = gather_rows(d, self.world)
        all_ids = [did for ids in gather_objects(doc_ids, self.world) for did in ids]
        targets, col = [], offset
        for _, _, negs in batch:
            targets.append(col)
            col += 1 + len(negs)
        sims = BI_ENCODER_SCALE * q @ d_all.T
        # A document that is another query's positive may be this query's positive too (two queries
        # generated from one document): it must not count as a negative.
        same = torch.tensor(
            [[all_ids[c] == pos and c != targets[i] for c in range(len(all_ids))] for i, (_, pos, _) in enumerate(batch)],
            device=sims.device,
        )
        sims = sims.masked_fill(same, float("-inf"))
        return torch.nn.functional.cross_entropy(sims, torch.tensor(targets, device=sims.device), reduction="sum")


def _group_softmax_loss(scores: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Summed cross-entropy of a softmax over each group's scores, the positive (index 0) as target."""
    losses = [-torch.log_softmax(group, dim=0)[0] for group in torch.split(scores, list(sizes))]
    return torch.stack(losses).sum()


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_model_type(model_type: str, name_or_path: str) -> str:
    """``model_type`` itself, or for ``auto`` what the starting checkpoint already is."""
    return guess_model_type(name_or_path) if model_type == "auto" else model_type


class DataOrder:
    """The global batch sequence: epoch after epoch, each its own shuffle of the groups from one
    seeded RNG. Its state (RNG, epoch, order, position) goes into checkpoints, so a resumed run
    sees exactly the batches an uninterrupted one would."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.rng = random.Random(seed)
        self.epoch, self.position, self.order = 0, 0, None

    def next_batch(self) -> list[int]:
        if self.order is None or self.position >= self.n:
            self.order = list(range(self.n))
            self.rng.shuffle(self.order)
            self.epoch, self.position = self.epoch + 1, 0
        batch = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "epoch": self.epoch, "position": self.position, "order": self.order}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.epoch, self.position, self.order = state["epoch"], state["position"], state["order"]


@dataclasses.dataclass
class _TrainJob:
    """Everything one training process needs (picklable: spawned DDP processes receive it)."""

    groups: list[tuple[str, str, list[str]]]
    docs: dict[str, Document]
    config: TrainConfig
    name_or_path: str
    identity: str
    device: str
    plan: LaunchPlan
    total: int
    steps_per_epoch: int
    learning_rate: float
    output_dir: str
    checkpointer: TrainCheckpointer | None
    fingerprint: str


def train_model(
    examples: Sequence[Mapping],
    docs: Mapping[str, Document],
    config: TrainConfig,
    output_dir: str | Path,
    *,
    on_progress: Callable[[int, int, float], None] | None = None,
    checkpointer: TrainCheckpointer | None = None,
    processes: int | None = None,
) -> dict[str, Any]:
    """Train ``config.model_type`` (``auto``: see the module docstring) on negatives rows and save it to ``output_dir``; returns stats.

    ``examples`` are rows ``{"query_id", "query", "pos_doc_id", "neg_doc_ids": [...]}`` (the negatives
    stage's output); ``config.batch_size`` counts groups (queries). The schedule is
    ``max_steps`` if set, else ``ceil(epochs * len(examples) / batch_size)`` steps; the examples are
    reshuffled each epoch from ``config.seed``, so a CPU run is reproducible bit for bit.

    ``checkpointer``: every ``config.checkpoint_every`` steps, and when a stop is requested
    (SIGTERM, :mod:`inpars.preemption`), the full training state is saved there, and a call that
    finds a checkpoint of the same training resumes from it; the result is bit-identical on CPU
    to an uninterrupted run. After a stop, :class:`~inpars.errors.Preempted` is raised.

    Devices (:mod:`inpars.distributed`): every GPU the process sees (one DDP process each), every
    TPU chip of the host (SPMD), or one CPU process; ``processes`` forces the process count.
    """
    if config.model_type not in ("auto", *MODEL_TYPES):
        raise ConfigError(f"unknown train.model_type {config.model_type!r} (one of auto, {', '.join(MODEL_TYPES)})")
    if config.loss not in LOSSES:
        raise ConfigError(f"unknown train.loss {config.loss!r} (one of {', '.join(LOSSES)})")
    _check_keep_initial(config.keep_initial)  # before training, not after it
    if config.batch_size < 1:
        raise ConfigError(f"train.batch_size must be >= 1, got {config.batch_size}")
    if config.checkpoint_every < 1:
        raise ConfigError(f"train.checkpoint_every must be >= 1, got {config.checkpoint_every}")
    groups = _check_examples(examples, docs)
    source = resolve_model(config.model)
    # Everything below, the stats and the saved metadata see the resolved type, never "auto".
    config = config.model_copy(update={"model_type": resolve_model_type(config.model_type, source.name_or_path)})
    log.info("training %s as a %s", source.identity, config.model_type)
    device_name = auto_device_name() if config.device == "auto" else config.device
    if device_name in ("tpu", "xla"):
        enable_spmd()  # before any tensor reaches the chips; one chip is a mesh of one
    device = resolve_device(device_name)
    resolve_dtype(config.dtype, device)  # a bad dtype fails here, before any process starts
    plan = launch_plan(device, device_count(device), processes)
    log.info("training plan: %s", plan.describe())
    lr = config.learning_rate if config.learning_rate is not None else default_learning_rate(config.model_type)
    steps_per_epoch = math.ceil(len(groups) / config.batch_size)
    total = config.max_steps if config.max_steps is not None else math.ceil(config.epochs * steps_per_epoch)
    if total < 1:
        raise ConfigError(f"nothing to train: {total} steps (epochs={config.epochs}, max_steps={config.max_steps})")
    used = {did for _, pos, negs in groups for did in [pos, *negs]}
    job = _TrainJob(
        groups=groups,
        docs={did: docs[did] for did in sorted(used)},  # spawned processes get only what they read
        config=config,
        name_or_path=source.name_or_path,
        identity=source.identity,
        device=str(device),
        plan=plan,
        total=total,
        steps_per_epoch=steps_per_epoch,
        learning_rate=lr,
        output_dir=str(output_dir),
        checkpointer=checkpointer,
        fingerprint=_fingerprint(config, source.identity, groups),
    )
    # A progress callback stays in this process; spawned DDP ranks report through their logs.
    return run_training(_train_process, (job, on_progress if plan.mode != "ddp" else None), plan)


def _fingerprint(config: TrainConfig, identity: str, groups: list) -> str:
    """What a checkpoint must have been trained on to be resumed: every setting that changes the
    weights (not the device or the checkpoint spacing), the base model and the examples."""
    settings = {k: v for k, v in config.model_dump(mode="json").items() if k not in ("checkpoint_every", "device", "held_out_fraction")}
    payload = json.dumps({"settings": settings, "base": identity, "groups": groups}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _train_process(job: _TrainJob, on_progress: Callable[[int, int, float], None] | None) -> dict[str, Any] | None:
    """The training loop of one process (the only one, or one DDP rank); rank 0 saves and returns stats."""
    config, plan, total = job.config, job.plan, job.total
    world = init_process_group(plan.backend) if plan.mode == "ddp" else World()
    device = local_device(torch.device(job.device))
    dtype = resolve_dtype(config.dtype, device)

    _seed_everything(config.seed)
    model, tokenizer, fresh = _load(config.model_type, job.name_or_path)
    initial = snapshot_weights(model, fresh) if config.keep_initial > 0 else None
    order = DataOrder(len(job.groups), config.batch_size, config.seed)
    losses: list[float] = []
    start = 0
    resume = _restore(job, world, model, order, losses) if job.checkpointer is not None else None
    if resume is not None:
        start = resume.step
        initial = resume.initial if initial is not None else None
    elif world.rank > 0:
        torch.manual_seed(config.seed + world.rank)  # dropout differs across ranks, as across batch rows
    model.to(device).train()

    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(model.parameters(), lr=job.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(WARMUP_FRACTION * total), total)
    if resume is not None:
        _restore_optimizer(resume, optimizer, scheduler)
        _set_rng_state(resume.rng, device)
    trained = model
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # A bi-encoder reads last_hidden_state: a checkpoint's pooler gets no gradient, and DDP must know.
        trained = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=config.model_type == "bi-encoder"
        )
    shard = batch_sharder(plan) if device.type == "xla" else None
    objective = _Objective(
        config.model_type, config.loss, trained, tokenizer, job.docs, config.max_length, device, config.relevance_tokens, world, shard
    )

    from tqdm.auto import tqdm

    started = time.perf_counter()
    bar = tqdm(total=total, initial=start, desc=f"train {config.model_type}", unit="step", disable=None if world.is_main else True)
    with preemption.stoppable():
        if any_rank(preemption.requested(), world, device):
            raise Preempted(f"training stopped before step {start + 1} of {total}; nothing new to save")
        for step in range(start + 1, total + 1):
            batch = [job.groups[i] for i in order.next_batch()]
            mine = share(batch, world)
            with attention_backends(device):
                with _autocast(device, dtype):  # the forward in bf16; backward outside autocast, as advised
                    loss = objective.loss_sum(mine or batch[:1], dummy=not mine) * loss_scale(world, objective.units(batch))
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            if device.type == "xla":
                xla_step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            value, stop = _step_summary(loss, preemption.requested(), world, device)
            if not math.isfinite(value):
                raise ConfigError(f"training diverged at step {step} (loss {value}); lower train.learning_rate")
            losses.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if on_progress is not None:
                on_progress(step, total, value)
            if step < total and (stop or step % config.checkpoint_every == 0) and job.checkpointer is not None:
                _save_checkpoint(job, step, world, model, optimizer, scheduler, order, losses, initial, device)
            if stop and step < total:
                saved = f"checkpointed at step {step}" if job.checkpointer is not None else "no checkpointer: a retry starts over"
                raise Preempted(f"training stopped after step {step} of {total}; {saved}")
    bar.close()
    seconds = time.perf_counter() - started
    if not world.is_main:
        return None
    if initial is not None:
        interpolate_weights(model, initial, config.keep_initial)
    stats = {
        "model_type": config.model_type,
        "base_model": job.identity,
        "loss": config.loss,
        "examples": len(job.groups),
        "steps": total,
        "epochs": total / job.steps_per_epoch,
        "batch_size": config.batch_size,
        "learning_rate": job.learning_rate,
        "keep_initial": config.keep_initial,
        "final_loss": losses[-1],
        "loss_curve": _curve(losses),
        "seconds": round(seconds, 3),
        "steps_per_second": round((total - start) / seconds, 4) if seconds > 0 else None,
        "device": str(device) if plan.mode == "single" else f"{device.type} x{plan.devices} ({plan.mode})",
        "dtype": str(dtype).replace("torch.", ""),
        "seed": config.seed,
    }
    _save(model, tokenizer, config, job.identity, stats, Path(job.output_dir))
    return stats


def _step_summary(loss: torch.Tensor, stop: bool, world: World, device: torch.device) -> tuple[float, bool]:
    """The global batch's mean loss, and whether any rank was asked to stop (one all-reduce)."""
    if world.size == 1:
        return float(loss.detach().cpu()), stop
    import torch.distributed as dist

    t = torch.stack([loss.detach().float(), torch.tensor(1.0 if stop else 0.0, device=loss.device)])
    dist.all_reduce(t)
    return float(t[0].cpu()) / world.size, bool(t[1].item() > 0)


# --------------------------------------------------------------------------- checkpoints

STATE_FILE, MODEL_FILE, OPTIMIZER_FILE, INITIAL_FILE, RNG_FILE = "state.json", "model.pt", "optimizer.pt", "initial.pt", "rng.pt"


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _rng_state(device: torch.device) -> dict[str, Any]:
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _set_rng_state(state: Mapping[str, Any] | None, device: torch.device) -> None:
    if state is None:
        return
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _save_checkpoint(job: _TrainJob, step, world: World, model, optimizer, scheduler, order: DataOrder, losses, initial, device) -> None:
    rng_states = gather_objects(_rng_state(device), world)  # every rank's RNG: dropout resumes exactly
    if not world.is_main:
        return
    with tempfile.TemporaryDirectory(prefix="inpars-ckpt-") as tmp:
        folder = Path(tmp)
        torch.save(_to_cpu(model.state_dict()), folder / MODEL_FILE)
        torch.save(_to_cpu(optimizer.state_dict()), folder / OPTIMIZER_FILE)
        torch.save(rng_states, folder / RNG_FILE)
        if initial is not None:
            torch.save(initial, folder / INITIAL_FILE)
        state = {
            "step": step,
            "total": job.total,
            "fingerprint": job.fingerprint,
            "world_size": world.size,
            "scheduler": scheduler.state_dict(),
            "data_order": order.state_dict(),
            "losses": losses,
        }
        (folder / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
        job.checkpointer.save(step, folder)
    log.info("checkpoint of step %d saved to %s", step, job.checkpointer)


@dataclasses.dataclass
class _Resume:
    step: int
    folder: Path
    state: dict[str, Any]
    initial: dict[str, torch.Tensor] | None
    rng: dict[str, Any] | None  # this rank's


def _restore(job: _TrainJob, world: World, model, order: DataOrder, losses: list[float]) -> _Resume | None:
    """Load the newest complete checkpoint of this very training into ``model``, ``order`` and
    ``losses`` (the optimizer and scheduler follow in :func:`_restore_optimizer`), or None."""
    found = job.checkpointer.latest()
    if found is None:
        return None
    step, folder = found
    state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    if state.get("fingerprint") != job.fingerprint or state.get("total") != job.total:
        log.warning("checkpoint %s is of another training (settings, model or examples differ): starting over", folder)
        return None
    model.load_state_dict(torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True))
    order.load_state_dict(state["data_order"])
    losses[:] = state["losses"]
    initial = torch.load(folder / INITIAL_FILE, map_location="cpu", weights_only=True) if (folder / INITIAL_FILE).exists() else None
    rng_states = torch.load(folder / RNG_FILE, map_location="cpu", weights_only=True)
    if state["world_size"] != world.size:
        log.warning("checkpoint written by %d processes, resumed by %d: dropout masks will differ", state["world_size"], world.size)
    log.info("resuming training from step %d of %d (%s)", step, job.total, folder)
    return _Resume(step, folder, state, initial, rng_states[world.rank] if world.rank < len(rng_states) else None)


def _restore_optimizer(resume: _Resume, optimizer, scheduler) -> None:
    optimizer.load_state_dict(torch.load(resume.folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    scheduler.load_state_dict(resume.state["scheduler"])


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
