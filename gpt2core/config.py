"""GPT-2 model configuration and the four OpenAI presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

GPT2_VOCAB_SIZE = 50257

PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}

#: The nn.Linear layers of GPT-2's blocks (gpt2core.model: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) by
#: the names LoRA may target (gpt2core.lora; the job spec's method.target_modules): a bare name matches every layer
#: of that name in every block ("c_proj": the attention and the MLP output projections), a qualified one only that
#: layer ("attn.c_proj"). lm_head is not one: it shares its weight with the token embedding. Torch-free, so the
#: job specifications (jobs.specs) check names against this same list.
GPT2_LINEAR_MODULES: tuple[str, ...] = ("c_attn", "c_proj", "c_fc", "attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                        "mlp.c_proj")
#: LoRA's default targets: every Linear layer of every block (QLoRA, Dettmers et al. 2023: adapting all of them is
#: what brings LoRA close to full fine-tuning; peft's own GPT-2 default, c_attn alone, adapts attention only).
LORA_DEFAULT_TARGET_MODULES: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")


@dataclass
class GPT2Config:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = GPT2_VOCAB_SIZE
    n_inner: int | None = None  # MLP width; None means 4 * n_embd, as in GPT-2
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    # Pad the embedding/output matrix to a multiple of this many rows (64 speeds up matmuls);
    # logits are always sliced back to vocab_size.
    pad_vocab_multiple: int = 1

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "pad_vocab_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPT2Config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner < 1):
            raise ValueError(f"GPT2Config.n_inner must be a positive integer or None, got {self.n_inner!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPT2Config.dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "GPT2Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GPT2Config":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown GPT2Config fields: {', '.join(sorted(unknown))}")
        return cls(**data)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` that transformers' GPT2LMHeadModel reads."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.block_size,
            "n_ctx": self.block_size,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": self.n_inner,
            "activation_function": "gelu_new",
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": self.dropout,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "torch_dtype": "float32",
        }
