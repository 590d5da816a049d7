"""The GPT-2 transformer, exactly as OpenAI defined it (and as Hugging Face's GPT2LMHeadModel computes it)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPT2_VOCAB_SIZE, GPT2Config


class CacheView(Protocol):
    """How attention reads and writes a key/value cache during generation (see gpt2core.generation.engine)."""

    attn_mask: torch.Tensor | None  # None means plain causal attention over the keys `write` returns

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, cache: CacheView | None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.write(self.layer, k, v)
            attn_mask = cache.attn_mask
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_width)
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's "gelu_new" is GELU with the tanh approximation.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, cache: CacheView | None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # Residual projections are scaled down so the residual stream's variance doesn't grow with depth.
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Parameter count, tied embedding counted once (as Hugging Face reports it)."""
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def hidden_states(
        self,
        idx: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: CacheView | None = None,
    ) -> torch.Tensor:
        """Final-LayerNorm hidden states (B, T, n_embd)."""
        T = idx.size(1)
        if position_ids is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            position_ids = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(position_ids))
        for block in self.transformer.h:
            x = block(x, attn_mask, cache)
        return self.transformer.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)[..., : self.config.vocab_size]

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) and, when targets are given, the mean cross-entropy loss.

        `attention_mask` (B, T) marks real tokens with 1 and padding with 0, as in transformers; with it,
        position ids count real tokens only, so a left-padded row computes what it would alone.
        Targets equal to -100 are ignored by the loss.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        mask = None
        if attention_mask is not None:
            mask, default_positions = padding_mask(attention_mask)
            if position_ids is None:
                position_ids = default_positions
        hidden = self.hidden_states(idx, position_ids, mask)
        logits = self.logits(hidden)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss

    @classmethod
    def from_pretrained(cls, path: str | Path, *, tokenizer_vocab_size: int | None = GPT2_VOCAB_SIZE,
                        **overrides) -> "GPT2":
        """Load a Hugging Face format directory (config.json and model.safetensors, pytorch_model.bin or their
        sharded forms), checked first by gpt2core.checkpoint.check_checkpoint. A model with fewer token embeddings
        than `tokenizer_vocab_size` (GPT-2's tokenizer by default; None: no check) is refused."""
        from .hf import load_pretrained

        return load_pretrained(cls, path, tokenizer_vocab_size=tokenizer_vocab_size, **overrides)

    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json and model.safetensors that transformers.GPT2LMHeadModel loads."""
        from .hf import save_pretrained

        save_pretrained(self, path)


def padding_mask(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean attention mask (B, 1, T, T) for a padded batch, and the position ids of its real tokens."""
    real = attention_mask.bool()
    T = real.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=real.device).tril()
    mask = causal & real[:, None, None, :]
    # A padding query would see no key at all (a row of -inf); letting it see itself keeps softmax finite.
    mask |= torch.eye(T, dtype=torch.bool, device=real.device)
    position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)
    return mask, position_ids
