import subprocess
import sys


def test_gpt2core_stands_alone():
    """gpt2core is usable alone: importing it pulls in no web, queue or database stack."""
    code = (
        "import sys, gpt2core; "
        "print(sorted(m for m in ('flask', 'celery', 'sqlalchemy', 'kombu', 'redis') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_api_names():
    import gpt2core

    for name in ("GPT2Config", "GPT2", "GPT2Tokenizer", "SamplingParams", "generate", "Trainer", "TrainConfig",
                 "prepare_dataset"):
        assert hasattr(gpt2core, name), name
