"""`python -m demo`: the platform end to end on the embedded default, driven through its own REST API.

Starts the API (gunicorn) and one worker (celery) as local processes on SQLite and the filesystem broker (no
servers), then: uploads the English text that ships with Python (`pydoc_data.topics`) as a training file, trains
a small GPT-2 on CPU with live progress, fine-tunes it on the part about statements, bulk-generates from a few
prompts, and prints the text and where the models and results are. Everything lives under GPT2JOBS_VAR_DIR
(default ./var); the processes' logs go to var/logs/.
"""
from __future__ import annotations

import argparse
import json
import time

import pydoc_data.topics

from jobs.settings import Settings

from .local import Client, LocalPlatform
PROMPTS = ["The for statement", "Exceptions are", "A class definition", "The import statement", "Lists are"]
FINETUNE_TOPICS = ("for", "while", "if", "try", "with", "import", "return", "break", "continue", "raise")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    var = settings.artifact_dir.parent
    corpus_dir = var / "demo"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    corpus = corpus_dir / "pydoc_topics.txt"
    corpus.write_text("\n\n".join(pydoc_data.topics.topics.values()), encoding="utf-8")
    statements = corpus_dir / "statements.txt"
    statements.write_text("\n\n".join(pydoc_data.topics.topics[t] for t in FINETUNE_TOPICS
                                      if t in pydoc_data.topics.topics), encoding="utf-8")

    started = time.monotonic()
    with LocalPlatform(var) as platform:
        key = platform.run("flask", "--app", "api", "keys", "create", "--owner", "demo").strip().splitlines()[-1]
        api = Client(platform.url, key)
        print(f"platform up at {platform.url} (SQLite and the filesystem broker under {var}); API key {key[:10]}...")

        training_file = api.upload(corpus, "train")
        print(f"uploaded {training_file['filename']}: {training_file['bytes']:,} bytes as {training_file['id']}")
        job = api.call("POST", "/v1/jobs", json={
            "type": "train", "training_file": training_file["id"], "suffix": "pydoc",
            "model": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128},
            "hyperparameters": {"max_steps": args.steps, "batch_size": 8, "learning_rate": 3e-3,
                                "eval_every": max(args.steps // 4, 1), "checkpoint_every": max(args.steps // 2, 1)},
            "seed": 0,
        })
        print(f"training job {job['id']} {job['status']}")
        job = api.wait(job)
        base = job["result"]["model"]
        print(f"trained {base}: val loss {job['result']['val_loss']:.3f}")

        finetune_file = api.upload(statements, "train")
        job = api.call("POST", "/v1/jobs", json={
            "type": "finetune", "training_file": finetune_file["id"], "model": base, "suffix": "statements",
            "hyperparameters": {"max_steps": max(args.steps // 5, 1), "batch_size": 8, "learning_rate": 1e-3,
                                "eval_every": max(args.steps // 10, 1)},
            "seed": 0,
        })
        print(f"fine-tuning job {job['id']} from {base}")
        job = api.wait(job)
        tuned = job["result"]["model"]
        print(f"fine-tuned {tuned}: val loss {job['result']['val_loss']:.3f}")

        job = api.call("POST", "/v1/jobs", json={
            "type": "generate", "model": tuned, "prompts": PROMPTS,
            "sampling": {"max_new_tokens": 40, "temperature": 0.7, "top_k": 40, "seed": 1},
        })
        print(f"generation job {job['id']}: {len(PROMPTS)} prompts")
        job = api.wait(job)
        results = api.get(f"{platform.url}/v1/jobs/{job['id']}/results.jsonl", timeout=60)
        results_file = corpus_dir / f"{job['id']}-results.jsonl"
        results_file.write_text(results.text, encoding="utf-8")
        for line in results.text.splitlines():
            result = json.loads(line)
            print(f"\n>>> {result['prompt']}{result['completions'][0]['text']}")
        models = [api.call("GET", f"/v1/models/{model_id}") for model_id in (base, tuned)]

    print(f"\ndone in {time.monotonic() - started:.0f} s")
    for model in models:
        print(f"model {model['id']} ({model['name']}, {model['parameter_count']:,} parameters): "
              f"{settings.artifact_dir / 'models' / model['id']} (Hugging Face format; "
              f"GET /v1/models/{model['id']}/download)")
    print(f"results: {results_file} (GET /v1/jobs/{job['id']}/results.jsonl)")
    print(f"logs: {var / 'logs'}")


if __name__ == "__main__":
    main()
