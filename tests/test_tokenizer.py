import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2core import GPT2Tokenizer


@pytest.mark.parametrize(
    "text, ids",
    [
        ("Hello world", [15496, 995]),
        ("hello world", [31373, 995]),
        (" Hello world", [18435, 995]),
        ("000000000", [10535, 830]),
    ],
)
def test_reference_vectors(tokenizer, text, ids):
    assert tokenizer.encode(text) == ids
    assert tokenizer.decode(ids) == text


def test_eot_in_user_text_is_ordinary_text(tokenizer):
    ids = tokenizer.encode("a<|endoftext|>b")
    assert tokenizer.eot_id not in ids
    assert tokenizer.decode(ids) == "a<|endoftext|>b"


def test_eot_allowed_explicitly(tokenizer):
    assert tokenizer.eot_id == 50256
    assert tokenizer.encode("a<|endoftext|>b", allow_special=True) == [64, 50256, 65]


@pytest.mark.parametrize(
    "text",
    [
        "中文分词测试，你好世界",
        "emoji 🤖🚀👩‍👩‍👧‍👦 flags 🇫🇷",
        "combining e\u0301 a\u0300\u0323 \u0915\u094d\u0937",
        " " * 300 + "\n\n\n\t\t  \r\n" + "x",
        "",
        "\x00\x01 control \x7f",
    ],
)
def test_round_trip_hard_strings(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode_bytes(tokenizer.encode(text)) == text.encode("utf-8")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",))))
def test_round_trip_any_string(text):
    tok = GPT2Tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_batch_encoding_matches_single(tokenizer):
    texts = [f"document {i}: " + "word " * i for i in range(50)]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


def test_whole_corpus_matches_reference_pattern(tokenizer):
    """tiktoken's possessive-quantifier pattern must split exactly like GPT-2's original regex."""
    import pydoc_data.topics
    import tiktoken

    reference = tiktoken.Encoding(
        name="gpt2-reference",
        pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=tokenizer.encoding._mergeable_ranks,
        special_tokens={},
    )
    text = "\n".join(pydoc_data.topics.topics.values())
    assert tokenizer.encode(text) == reference.encode_ordinary(text)
