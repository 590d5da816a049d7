"""Bulk generation jobs, split into shards any worker can take.

The first delivery of a job claims it, plans its shards and sends one more message per extra shard, so every
idle worker on the `generate` queue joins in. Each delivery then takes shards until none is left; a shard's
results are upserted by (job, index), so a shard done twice never duplicates a line. The claimer of the job
stays until the job ends (it takes over shards whose workers died); whoever completes the last shard, or sees
the job cancelling, ends the job.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2core import GPT2, GPT2Tokenizer, SamplingParams, generate
from jobs import execution
from jobs.models import File, Job, Model
from jobs.queue import enqueue
from jobs.states import RUNNING

from .runtime import JobFailure, LeaseKeeper, Runtime, error_for

log = logging.getLogger("workers.generation")

MAX_FANOUT = 64  # extra messages sent for one job
IDLE_POLL_SECONDS = 1.0  # how often the job's claimer looks again while other workers finish shards


@dataclass(frozen=True)
class Item:
    index: int
    custom_id: str | None
    prompt: str
    sampling: dict[str, Any]  # this line's overrides of the job's sampling


class ModelCache:
    """Loaded models of this worker process, least recently used dropped first (at most `capacity`)."""

    def __init__(self) -> None:
        self.models: OrderedDict[str, GPT2] = OrderedDict()

    def get(self, model: Model, capacity: int) -> GPT2:
        key = f"{model.id}:{model.storage_path}"
        if key in self.models:
            self.models.move_to_end(key)
            return self.models[key]
        if not Path(model.storage_path, "config.json").is_file():
            raise JobFailure("model_not_found", f"The weights of model {model.id!r} are missing.", "model")
        while len(self.models) >= max(capacity, 1):
            self.models.popitem(last=False)
        loaded = GPT2.from_pretrained(model.storage_path).eval()
        self.models[key] = loaded
        return loaded


MODELS = ModelCache()
TOKENIZER: GPT2Tokenizer | None = None


def tokenizer() -> GPT2Tokenizer:
    global TOKENIZER
    if TOKENIZER is None:
        TOKENIZER = GPT2Tokenizer()
    return TOKENIZER


def load_items(job: Job, input_file: File | None) -> list[Item]:
    if job.params.get("prompts") is not None:
        return [Item(i, None, prompt, {}) for i, prompt in enumerate(job.params["prompts"])]
    if input_file is None:
        raise JobFailure("invalid_file", "The input file was deleted before the job ran.", "input_file")
    items = []
    with open(input_file.storage_path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                record = json.loads(line)
                items.append(Item(len(items), record["custom_id"], record["prompt"], record.get("sampling", {})))
    return items


def item_seed(job_seed: int, index: int) -> int:
    """A seed per item that depends only on the job's seed and the item's position, not on sharding."""
    digest = hashlib.sha256(f"{job_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def error_result(item: Item, code: str, message: str, param: str) -> dict[str, Any]:
    return {"index": item.index, "custom_id": item.custom_id, "prompt": item.prompt, "completions": [],
            "usage": {}, "error": {"code": code, "message": message, "param": param}}


def generate_items(model: GPT2, job_sampling: dict[str, Any], items: list[Item]) -> list[dict[str, Any]]:
    """One result per item, in order: completions, or an error for an item that cannot run (the rest go on)."""
    tok = tokenizer()
    results: dict[int, dict[str, Any]] = {}
    runnable: list[tuple[Item, SamplingParams]] = []
    for item in items:
        sampling = {**job_sampling, **item.sampling}
        if item.sampling.get("seed") is None:
            sampling["seed"] = item_seed(job_sampling["seed"], item.index)
        try:
            params = SamplingParams.from_dict(sampling)
        except (TypeError, ValueError) as exc:
            results[item.index] = error_result(item, "invalid_sampling", str(exc), "sampling")
            continue
        prompt_tokens = max(len(tok.encode(item.prompt)), 1)
        if prompt_tokens + params.max_new_tokens > model.config.block_size:
            results[item.index] = error_result(
                item, "prompt_too_long", f"The prompt has {prompt_tokens} tokens; with max_new_tokens "
                f"{params.max_new_tokens} that exceeds the model's context of {model.config.block_size}.", "prompt")
            continue
        runnable.append((item, params))
    if runnable:
        outputs = generate(model, tok, [item.prompt for item, _ in runnable], [params for _, params in runnable])
        for (item, _), output in zip(runnable, outputs):
            completion_tokens = sum(c.num_tokens for c in output.completions)
            results[item.index] = {
                "index": item.index, "custom_id": item.custom_id, "prompt": item.prompt,
                "completions": [{"index": i, "text": c.text, "finish_reason": c.finish_reason,
                                 "tokens": c.num_tokens} for i, c in enumerate(output.completions)],
                "usage": {"prompt_tokens": output.prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": output.prompt_tokens + completion_tokens, "seed": output.seed},
                "error": None,
            }
    return [results[item.index] for item in items]


def run_generation(rt: Runtime, job_id: str) -> None:
    """Take part in generation job `job_id`: claim and plan it if it is new, then work on its shards."""
    lease_seconds = rt.settings.job_lease_seconds
    with rt.transaction() as session:
        job = execution.claim_job(session, job_id, rt.worker_id, lease_seconds)
        claimed = job is not None
        job = job or session.get(Job, job_id)
        if job is None or job.status != RUNNING:
            log.info("job %s: nothing to do (%s)", job_id, "gone" if job is None else job.status)
            return
        model = session.get(Model, job.base_model_id) if job.base_model_id else None
        input_file = session.get(File, job.input_file_id) if job.input_file_id else None
    if not claimed:
        try:
            work_on_shards(rt, job, model, input_file, stay=False)
        except Exception as exc:
            log.exception("job %s failed", job_id)
            with rt.transaction() as session:
                execution.finish_generation(session, job_id, error=error_for(exc))
        return

    def renew(session) -> str:
        return execution.renew_lease(session, job_id, rt.worker_id, lease_seconds)

    with LeaseKeeper(rt, renew, f"job {job_id}"):
        try:
            items = load_items(job, input_file)
            with rt.transaction() as session:
                shards = execution.plan_shards(session, job_id, len(items), rt.settings.generation_shard_size)
            for _ in range(min(shards - 1, MAX_FANOUT)):
                enqueue(rt.celery, "generate", job_id)
            log.info("job %s: %d prompts in %d shards", job_id, len(items), shards)
            work_on_shards(rt, job, model, input_file, stay=True, items=items)
        except Exception as exc:
            log.exception("job %s failed", job_id)
            with rt.transaction() as session:
                execution.finish_generation(session, job_id, error=error_for(exc))


def work_on_shards(rt: Runtime, job: Job, model_row: Model | None, input_file: File | None, stay: bool,
                   items: list[Item] | None = None) -> None:
    """Take shards until none is claimable; with `stay`, keep watching until the job ends."""
    lease_seconds = rt.settings.job_lease_seconds
    model: GPT2 | None = None
    while True:
        with rt.transaction() as session:
            shard = execution.claim_shard(session, job.id, rt.worker_id, lease_seconds)
            span = None if shard is None else (shard.index, shard.start, shard.stop)
            if span is None:
                status = session.get(Job, job.id).status
                remaining = execution.shards_remaining(session, job.id)
                if status != RUNNING or remaining == 0:
                    finished = execution.finish_generation(session, job.id)
                    if finished is not None:
                        log.info("job %s: %s", job.id, finished.status)
                    return
        if span is None:
            if not stay:
                return
            time.sleep(IDLE_POLL_SECONDS)
            continue
        index, start, stop = span
        if model_row is None:
            raise JobFailure("model_not_found", "The job's model was deleted before the job ran.", "model")
        items = items if items is not None else load_items(job, input_file)
        model = model or MODELS.get(model_row, rt.settings.model_cache_size)

        def renew(session, index=index) -> str:
            return execution.renew_shard(session, job.id, index, rt.worker_id, lease_seconds)

        with LeaseKeeper(rt, renew, f"job {job.id} shard {index}"):
            results = generate_items(model, job.params["sampling"], items[start:stop])
        rt.retrying(lambda session: execution.complete_shard(session, job.id, index, rt.worker_id, results))
        log.info("job %s: shard %d done (%d items)", job.id, index, stop - start)
