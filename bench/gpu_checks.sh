#!/usr/bin/env bash
# The GPU checks, in one go, for whoever has a CUDA machine for a few minutes:
#
#     bash bench/gpu_checks.sh 2>&1 | tee gpu_checks.log
#
# Everything goes to stdout (the commands too, from set -x). Each step is bounded with `timeout` (seconds in
# the *_TIMEOUT variables below; about 2-3 minutes in all on an H100/H200) and a failing step does not stop the
# next one; the last line lists each step's exit status (124: it ran out of time). PYTHON picks the interpreter
# (default: .venv/bin/python if there is one, else python); it needs torch with CUDA and the test extra
# (pip install -e '.[test]').
# TRAIN_BATCH (default 16) is the benchmark's micro-batch at T=1024; lower it on a 24 GB card.
exec 2>&1
set -x
cd "$(dirname "$0")/.." || exit 1
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-240}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}
DDP_TIMEOUT=${DDP_TIMEOUT:-240}
declare -A status

nvidia-smi
status[nvidia-smi]=$?
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
status[torch]=$?

# bf16 autocast + fused AdamW in the Trainer, flash attention, logits vs transformers in fp32, torch.compile vs
# eager, generation token counts (skipped, not failed, without a CUDA device: the summary line says "skipped").
timeout -k 10 "$PYTEST_TIMEOUT" "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py
status[pytest]=$?

# Training MFU at the gpt2 preset, T=1024 (bf16 autocast, fused AdamW, gpt2core compiled; peak looked up by the
# device's name) and generation tokens/s, gpt2core vs transformers' batched generate().
timeout -k 10 "$BENCH_TIMEOUT" "$PYTHON" bench/model_vs_hf.py --preset gpt2 --train-batch "${TRAIN_BATCH:-16}" --train-seq 1024 --repeats 5
status[model_vs_hf]=$?

if [[ -f bench/ddp_scaling.py ]]; then
    timeout -k 10 "$DDP_TIMEOUT" "$PYTHON" bench/ddp_scaling.py
    status[ddp_scaling]=$?
else
    echo "bench/ddp_scaling.py: not there"
    status[ddp_scaling]=missing
fi

set +x
summary=""
for step in nvidia-smi torch pytest model_vs_hf ddp_scaling; do summary+="$step=${status[$step]} "; done
echo "gpu_checks: $summary"
for step in "${!status[@]}"; do [[ "${status[$step]}" == 0 ]] || exit 1; done
