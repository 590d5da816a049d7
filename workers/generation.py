"""Bulk generation jobs, split into shards any worker can take.

The first delivery of a job claims it, plans its shards and sends one more message per extra shard, so every
idle worker on the `generate` queue joins in. Each delivery then takes shards until none is left; a shard's
results are upserted by (job, index), so a shard done twice never duplicates a line. The claimer of the job
stays until the job ends (it takes over shards whose workers died); whoever completes the last shard, or sees
the job cancelling, ends the job. A pausing job hands out no new shard; the shards being generated are finished
and stored, and then the job is paused; resumed, it goes on with the shards not done.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from gpt2core import GPT2, GPT2Tokenizer, generate
from gpt2core.device import default_device
from gpt2core.generation import Completion, GenerationResult, auto_batch_size
from jobs import batch_output, execution, repository, shards
from jobs.errors import BrokerUnavailable, DomainError, new_reference
from jobs.models import File, Job, Model
from jobs.queue import enqueue
from jobs.openai_batch import iter_batch_requests
from jobs.readers import FileRejected, read_generation_file
from jobs.specs import GenerateSpec, Sampling, job_spec
from jobs.states import PAUSING, RUNNING

from .convert import sampling_params
from .runtime import ACTIVE_JOBS, SHUTTING_DOWN, JobFailure, LeaseKeeper, Runtime, error_for, is_infrastructure_error

log = logging.getLogger("workers.generation")

MAX_FANOUT = 64  # extra messages sent for one job
IDLE_POLL_SECONDS = 1.0  # how often the job's claimer looks again while other workers finish shards
MAX_SHARD_ATTEMPTS = 3  # a shard whose generation raises this often fails its job
# Prompts generated together on CPU (on CUDA: batch_prompts); a shutting-down worker stops between two batches.
BATCH_PROMPTS = 32


@dataclass(frozen=True)
class Item:
    index: int
    custom_id: str | None
    prompt: str
    sampling: Sampling  # the job's sampling with this line's overrides
    overrides: Sampling | None = None  # the line's own "sampling", as written
    length_name: str = "max_new_tokens"  # what the user called the completion's length (a batch line: max_tokens)

    @property
    def seed(self) -> int:
        """The line's own seed, else one derived from the job's seed and the item's position (item_seed)."""
        if self.overrides is not None and self.overrides.seed is not None:
            return self.overrides.seed
        assert self.sampling.seed is not None  # drawn at submission
        return item_seed(self.sampling.seed, self.index)


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
        loaded = for_generation(GPT2.from_pretrained(model.storage_path).eval())
        self.models[key] = loaded
        return loaded


def for_generation(model: GPT2, device: torch.device | None = None) -> GPT2:
    """`model` moved to the worker's device (gpt2core's default_device: CUDA when the worker has a GPU, which is
    how training picks it too), in bfloat16 on a CUDA device that has it (weights and KV cache at half the bytes
    of float32, so twice the completions per step; gpt2core.generate keeps logits and sampling in float32/float64);
    on CPU as it is (float32)."""
    device = device or default_device()
    if device.type != "cuda":
        return model
    return model.to(device=device, dtype=torch.bfloat16 if bf16_supported() else None)


def bf16_supported() -> bool:
    """Native bfloat16 on the current CUDA device (compute capability 8.0 and up), not emulated."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3 has no including_emulation (and answers for native support)
        return torch.cuda.is_bf16_supported()


MODELS = ModelCache()
TOKENIZER: GPT2Tokenizer | None = None


def tokenizer() -> GPT2Tokenizer:
    global TOKENIZER
    if TOKENIZER is None:
        TOKENIZER = GPT2Tokenizer()
    return TOKENIZER


def load_items(job: Job, input_file: File | None) -> list[Item]:
    """The job's prompts with their sampling, read from the job or by the same reader the upload check ran."""
    try:
        spec = job_spec(job)
    except DomainError as exc:
        raise JobFailure("invalid_file", exc.message, exc.param) from None
    assert isinstance(spec, GenerateSpec)
    if spec.prompts is not None:
        return [Item(i, None, prompt, spec.sampling) for i, prompt in enumerate(spec.prompts)]
    assert input_file is not None
    with open(input_file.storage_path, "rb") as stream:
        if input_file.purpose == "batch":  # OpenAI batch requests, read as POST /v1/batches read them
            return batch_items(spec, stream, input_file.filename)
        return [Item(line.index, line.custom_id, line.prompt,
                     spec.sampling.merged(line.sampling) if line.sampling else spec.sampling, line.sampling)
                for line in read_generation_file(stream, input_file.filename)]


def batch_items(spec: GenerateSpec, stream: BinaryIO, filename: str) -> list[Item]:
    """The requests of an OpenAI batch file (jobs.openai_batch), each with its own parameters over the job's
    sampling. A file with problems, or requests naming another model than the job's, fail the job (invalid_file):
    a batch with problems never has a job, so only a generate job given a batch file through /v1/jobs meets this."""
    items = []
    try:
        for request in iter_batch_requests(stream, filename):
            if request.model != spec.model:
                raise JobFailure("invalid_file", f"{filename}: line {request.line}: body.model is {request.model!r}, "
                                 f"but the job runs model {spec.model!r}", "input_file")
            assert request.prompt is not None and request.sampling is not None  # no problems: both are there
            items.append(Item(request.index, request.custom_id, request.prompt, spec.sampling.merged(request.sampling),
                              request.sampling, "max_tokens"))
    except FileRejected as exc:
        raise JobFailure("invalid_file", exc.message, "input_file") from None
    return items


def line_warnings(items: list[Item]) -> list[str]:
    """Settings of the input file's lines that cannot take effect (the job's own were reported at submission),
    one message per kind, with how many lines and the first line's custom_id."""
    found: dict[str, list[str | None]] = {}
    for item in items:
        if item.overrides is not None:
            for message in item.sampling.ignored():
                found.setdefault(message, []).append(item.custom_id)
    return [f"{message} (in {len(ids)} line{'s' if len(ids) > 1 else ''} of the input file; first: custom_id "
            f"{ids[0]!r})" for message, ids in found.items()]


def item_seed(job_seed: int, index: int) -> int:
    """A seed per item that depends only on the job's seed and the item's position, not on sharding."""
    digest = hashlib.sha256(f"{job_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def error_result(item: Item, code: str, message: str, param: str | None) -> dict[str, Any]:
    return {"index": item.index, "custom_id": item.custom_id, "prompt": item.prompt, "completions": [],
            "usage": {}, "error": {"code": code, "message": message, "param": param}}


def completion_result(item: Item, output: GenerationResult) -> dict[str, Any]:
    completion_tokens = sum(c.num_tokens for c in output.completions)
    return {
        "index": item.index, "custom_id": item.custom_id, "prompt": item.prompt,
        "completions": [completion_object(i, c) for i, c in enumerate(output.completions)],
        "usage": {"prompt_tokens": output.prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": output.prompt_tokens + completion_tokens, "seed": output.seed},
        "error": None,
    }


def completion_object(index: int, completion: Completion) -> dict[str, Any]:
    """`text` is the decoded completion (byte sequences that are not UTF-8 read as U+FFFD); `token_ids` are the
    exact tokens generated, the end-of-text or stop token included, from which the exact bytes follow."""
    return {"index": index, "text": completion.text, "finish_reason": completion.finish_reason,
            "tokens": completion.num_tokens, "token_ids": list(completion.token_ids)}


class ShuttingDown(Exception):
    """This worker is shutting down: it stopped between batches and wrote nothing for its shard."""


def generate_items(model: GPT2, job_id: str, items: list[Item],
                   should_stop: Callable[[], bool] = lambda: False) -> list[dict[str, Any]]:
    """One result per item, in order, computed batch_prompts(model) prompts at a time; ShuttingDown when
    `should_stop()` holds between two batches."""
    results: list[dict[str, Any]] = []
    size = batch_prompts(model)
    for start in range(0, len(items), size):
        if should_stop():
            raise ShuttingDown()
        results += generate_batch(model, job_id, items[start:start + size])
    return results


def batch_prompts(model: GPT2) -> int:
    """Prompts per generate() call: BATCH_PROMPTS on CPU (a batch is seconds of work there); on CUDA as many
    completions as the device's free memory holds at once for sequences of the model's whole block_size
    (gpt2core.generation.auto_batch_size), and at least BATCH_PROMPTS. generate() itself then decodes as many as
    fit for the batch's real lengths, so a shard no bigger than this is one generate() call on a GPU."""
    if model.device.type != "cuda":
        return BATCH_PROMPTS
    return max(BATCH_PROMPTS, auto_batch_size(model))


def generate_batch(model: GPT2, job_id: str, items: list[Item]) -> list[dict[str, Any]]:
    """One result per item, in order: completions, or that item's error. Nothing one prompt does (bad sampling,
    a prompt too long, any exception while generating or decoding it) fails the others: a failed batch is run
    again prompt by prompt (each prompt's seed makes its completions the same either way)."""
    tok = tokenizer()
    results: dict[int, dict[str, Any]] = {}
    runnable = []
    for item in items:
        try:
            params = sampling_params(item.sampling, item.seed)
            # tokenized once: generate() takes the ids (an empty prompt starts from end-of-text, one token)
            ids = tok.encode(item.prompt)
            prompt_tokens = max(len(ids), 1)
        except Exception as exc:
            results[item.index] = item_failure(item, job_id, exc)
            continue
        if prompt_tokens + params.max_new_tokens > model.config.block_size:
            results[item.index] = error_result(
                item, "prompt_too_long", f"The prompt has {prompt_tokens} tokens; with {item.length_name} "
                f"{params.max_new_tokens} that exceeds the model's context of {model.config.block_size}.", "prompt")
            continue
        runnable.append((item, params, ids))
    try:
        outputs = generate(model, tok, [ids for _, _, ids in runnable], [params for _, params, _ in runnable])
        results.update((item.index, completion_result(item, output)) for (item, _, _), output in zip(runnable, outputs))
    except Exception:
        log.warning("job %s: a batch of %d prompts failed; running them one by one", job_id, len(runnable),
                    exc_info=True)
        for item, params, ids in runnable:
            try:
                results[item.index] = completion_result(item, generate(model, tok, [ids], [params])[0])
            except Exception as exc:
                results[item.index] = item_failure(item, job_id, exc)
    return [results[item.index] for item in items]


def item_failure(item: Item, job_id: str, exc: Exception) -> dict[str, Any]:
    """The error line of one prompt that raised, with a reference id that the worker's log shows next to the
    traceback. (Sampling was validated at the door by jobs.specs, so nothing here is the user's to fix.)"""
    reference = new_reference()
    log.error("job %s: prompt %d failed (reference %s)", job_id, item.index, reference, exc_info=exc)
    return error_result(item, "generation_failed", f"Generating this prompt failed (reference {reference}).",
                        None)


def run_generation(rt: Runtime, job_id: str) -> None:
    """Take part in generation job `job_id` (see take_part); then, if the job has ended and runs a batch, write the
    batch's output files (jobs.batch_output.finalize_batch; the workers' sweep does it if this fails or never comes)."""
    take_part(rt, job_id)
    finish_batch(rt, job_id)


def finish_batch(rt: Runtime, job_id: str) -> None:
    """Finalize the batch job `job_id` runs, if any and the job has ended; an error is logged, not raised."""
    try:
        if batch_output.finalize_job_batch(rt.sessions, rt.artifacts, job_id):
            log.info("job %s: its batch's output files are written", job_id)
    except Exception:
        log.warning("job %s: writing its batch's output files failed; the sweep will try again", job_id,
                    exc_info=True)


def take_part(rt: Runtime, job_id: str) -> None:
    """Take part in generation job `job_id`: claim and plan it if it is new, then work on its shards.

    When this worker shuts down, or loses the database or broker, its shard goes back to the pool and, if it
    holds the job, the job goes back to the queue for the next free worker; neither fails the job."""
    lease_seconds = rt.settings.job_lease_seconds
    with rt.transaction() as session:
        job = execution.claim_job(session, job_id, rt.worker_id, lease_seconds,
                                  max_attempts=rt.settings.job_max_attempts,
                                  resume_own=job_id not in ACTIVE_JOBS)
        claimed = job is not None
        job = job or session.get(Job, job_id)
        if job is None or job.status != RUNNING:
            log.info("job %s: nothing to do (%s)", job_id, "gone" if job is None else job.status)
            return
        model = session.get(Model, job.base_model_id) if job.base_model_id else None
        input_file = session.get(File, job.input_file_id) if job.input_file_id else None
    paths = {input_file.storage_path: input_file.filename} if input_file is not None else {}
    if not claimed:
        try:
            work_on_shards(rt, job, model, input_file, stay=False)
        except ShuttingDown:
            log.info("job %s: shutting down; the shard went back to the pool", job_id)
        except Exception as exc:
            if is_infrastructure_error(exc):
                raise
            error = error_for(exc, job_id, paths)
            rt.persist(lambda session: shards.finish_generation(session, job_id, error=error))
        return

    def renew(session) -> str:
        return execution.renew_lease(session, job_id, rt.worker_id, lease_seconds)

    reason = None
    with LeaseKeeper(rt, renew, f"job {job_id}"):
        try:
            items = load_items(job, input_file)
            def plan(session) -> int:
                if job.attempts == 1:
                    for message in line_warnings(items):
                        repository.add_event(session, job_id, message, level="warning")
                return shards.plan_shards(session, job_id, len(items), rt.settings.generation_shard_size)

            planned = rt.persist(plan)
            for _ in range(min(planned - 1, MAX_FANOUT)):
                enqueue(rt.celery, "generate", job_id)
            log.info("job %s: %d prompts in %d shards", job_id, len(items), planned)
            work_on_shards(rt, job, model, input_file, stay=True, items=items)
        except ShuttingDown:
            reason = "the worker is shutting down (its unfinished shard went back to the pool)"
        except Exception as exc:
            if not is_infrastructure_error(exc):
                error = error_for(exc, job_id, paths)
                rt.persist(lambda session: shards.finish_generation(session, job_id, error=error))
                return
            log.warning("job %s: database or broker unreachable; handing the job back", job_id, exc_info=True)
            reason = f"it lost the database or the broker ({type(exc).__name__})"
    if reason is not None:
        hand_back(rt, job, reason)


def hand_back(rt: Runtime, job: Job, reason: str) -> None:
    """Give the job this worker holds back to the queue (the next free worker claims it and goes on with its
    shards) and send it a message; the sweeper sends one if the broker is away now."""
    message = (f"Worker {rt.worker_id} stopped: {reason}; the job is back in the queue and goes on with its "
               "remaining shards on the next free worker")
    try:
        if rt.persist(lambda session: execution.hand_back(session, job.id, rt.worker_id, message)):
            enqueue(rt.celery, job.type, job.id)
    except execution.LeaseLost:
        pass
    except BrokerUnavailable:
        log.warning("job %s: handed back, but the broker is unreachable; the sweeper will send it", job.id)


def work_on_shards(rt: Runtime, job: Job, model_row: Model | None, input_file: File | None, stay: bool,
                   items: list[Item] | None = None) -> None:
    """Take shards until none is claimable; with `stay`, keep watching until the job ends. ShuttingDown when this
    worker shuts down (its unfinished shard is back in the pool); infrastructure errors propagate (likewise)."""
    lease_seconds = rt.settings.job_lease_seconds
    model: GPT2 | None = None
    while True:
        if SHUTTING_DOWN.is_set():
            raise ShuttingDown()

        def take(session) -> tuple[tuple[int, int, int, int] | None, bool]:
            """(index, start, stop, attempts) of the shard claimed, or None; and whether the job is over."""
            shard = shards.claim_shard(session, job.id, rt.worker_id, lease_seconds)
            if shard is not None:
                return (shard.index, shard.start, shard.stop, shard.attempts), False
            status = session.get(Job, job.id).status
            if status != RUNNING or shards.shards_remaining(session, job.id) == 0:
                finished = shards.finish_generation(session, job.id)
                if finished is not None:
                    log.info("job %s: %s", job.id, finished.status)
                    return None, True
                # Pausing: paused by whoever stores the last shard being generated (or, if that worker is lost,
                # once its shard lease has run out).
                return None, status != PAUSING
            return None, False

        claimed, over = rt.persist(take)
        if over:
            return
        if claimed is None:
            if not stay:
                return
            time.sleep(IDLE_POLL_SECONDS)
            continue
        index, start, stop, attempts = claimed
        if model_row is None:
            raise JobFailure("model_not_found", "The job's model was deleted before the job ran.", "model")

        def renew(session, index=index) -> str:
            return shards.renew_shard(session, job.id, index, rt.worker_id, lease_seconds)

        timings = {"started": time.perf_counter()}  # where a shard's time goes, for the log line below
        try:
            items = items if items is not None else load_items(job, input_file)
            model = model or MODELS.get(model_row, rt.settings.model_cache_size)
            with LeaseKeeper(rt, renew, f"job {job.id} shard {index}"):  # also while it waits for the database
                timings["generating"] = time.perf_counter()
                results = generate_items(model, job.id, items[start:stop], SHUTTING_DOWN.is_set)
                timings["storing"] = time.perf_counter()
                rt.persist(lambda session, index=index, results=results: shards.complete_shard(
                    session, job.id, index, rt.worker_id, results))
        except Exception as exc:
            if isinstance(exc, ShuttingDown) or is_infrastructure_error(exc):
                release(rt, job.id, index, "this worker is shutting down" if isinstance(exc, ShuttingDown)
                        else f"this worker lost the database or the broker ({type(exc).__name__})")
                raise
            # A JobFailure (the model's files are gone, the input file is invalid) is the same on every try: the job
            # fails now. Anything else is not a prompt's fault (those become error lines): try the shard again.
            if isinstance(exc, JobFailure) or attempts >= MAX_SHARD_ATTEMPTS:
                raise
            log.warning("job %s: shard %d failed (attempt %d of %d); it will be retried", job.id, index, attempts,
                        MAX_SHARD_ATTEMPTS, exc_info=True)
            with rt.transaction() as session:
                shards.release_shard(session, job.id, index, rt.worker_id)
                repository.add_event(session, job.id, f"Shard {index} failed unexpectedly; retrying "
                                     f"(attempt {attempts} of {MAX_SHARD_ATTEMPTS})", level="warning")
            continue
        done = time.perf_counter()
        log.info("job %s: shard %d done (%d items) in %.2f s: %.2f s loading, %.2f s generating, %.2f s storing",
                 job.id, index, stop - start, done - timings["started"], timings["generating"] - timings["started"],
                 timings["storing"] - timings["generating"], done - timings["storing"])


def release(rt: Runtime, job_id: str, index: int, reason: str) -> None:
    """Put the shard back in the pool with an event, not counting this attempt (the shard is not at fault), if the
    database answers (else its lease runs out and the sweeper does it)."""
    def unit(session) -> None:
        if shards.release_shard(session, job_id, index, rt.worker_id, count_attempt=False):
            repository.add_event(session, job_id, f"Shard {index} went back to the pool: {reason}", level="warning",
                                 data={"shard": index, "worker": rt.worker_id})

    try:
        rt.persist(unit, patience=5)
    except Exception:
        log.warning("job %s: could not give shard %d back; its lease will run out", job_id, index, exc_info=True)
