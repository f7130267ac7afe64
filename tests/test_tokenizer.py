"""The shipped tokenizer (data/tokenizer), train_tokenizer and load_tokenizer."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lightning_sp.data.tokenizer import (
    IMAGE_TOKEN,
    VICUNA_SYSTEM,
    default_corpus,
    load_tokenizer,
    main,
    train_tokenizer,
)

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "tokenizer"
TEXTS = [
    "What color is the circle in the top left? Red.",
    f"{VICUNA_SYSTEM} USER: hi ASSISTANT: Hello!</s>",
    "Arbitrary text: zebra-crossing, 12345, tabs\tand\nnewlines,  double  spaces ",
    "Unicode: élan, naïve, 東京, 😀.",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(SHIPPED)


def test_shipped_tokenizer_is_small_and_has_llama_like_specials(tok):
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 200_000
    assert 900 <= len(tok) <= 1024
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == 4
    assert IMAGE_TOKEN in tok.all_special_tokens
    assert tok.padding_side == "right"


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # BOS prepended once
    assert tok.eos_token_id not in ids or "</s>" in text  # no EOS appended
    assert tok.decode(ids, skip_special_tokens=True) == text.replace("</s>", "")
    assert tok.decode(ids[1:]) == text


def test_image_token_is_one_id_anywhere(tok):
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    for text in [IMAGE_TOKEN, f"x{IMAGE_TOKEN}y", f"USER: {IMAGE_TOKEN}\nWhat?", "a<image>b"]:
        ids = tok(text)["input_ids"]
        assert ids.count(image_id) == 1, text
        assert tok.decode(ids[1:]) == text


def _assert_offsets_exact(tok, text):
    enc = tok(text, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    assert offsets[0] == (0, 0)  # BOS: zero width
    # Every later token starts where the previous one ended (ASCII: one byte per char), and the
    # chars under each token are exactly the token's text.
    assert [start for start, _ in offsets[1:]] == [0] + [end for _, end in offsets[1:-1]]
    assert offsets[-1][1] == len(text)
    for tid, (start, end) in zip(enc["input_ids"][1:], offsets[1:]):
        assert tok.decode([tid]) == text[start:end]


def test_shipped_offsets_map_back_to_text(tok):
    for text in TEXTS[:3] + [f"USER: {IMAGE_TOKEN}\nQ? ASSISTANT: A.</s>USER: x"]:
        _assert_offsets_exact(tok, text)
    # Non-ASCII chars may span several byte tokens; those tokens then share the char's offsets.
    text = TEXTS[3]
    offsets = tok(text, return_offsets_mapping=True)["offset_mapping"][1:]
    covered = set().union(*(range(s, e) for s, e in offsets))
    assert covered == set(range(len(text)))


def test_train_tokenizer_tmp_dir(tmp_path):
    texts = ["the red circle is left of the blue square"] * 3 + ["hello world, hello there"]
    tok = train_tokenizer(texts, tmp_path / "tok", vocab_size=300)
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    reloaded = load_tokenizer(tmp_path / "tok")
    for t in (tok, reloaded):
        assert len(t) <= 300
        assert (
            t(f"{IMAGE_TOKEN}hi")["input_ids"]
            == [t.bos_token_id, t.convert_tokens_to_ids(IMAGE_TOKEN)] + t("hi", add_special_tokens=False)["input_ids"]
        )
        _assert_offsets_exact(t, "the red circle, unseen words: zyx 42!")


def test_shipped_tokenizer_is_reproducible(tmp_path):
    """data/tokenizer is exactly what `python -m lightning_sp.data.tokenizer` builds from default_corpus()."""
    main(["--out", str(tmp_path)])
    built = json.loads((tmp_path / "tokenizer.json").read_text())["model"]
    shipped = json.loads((SHIPPED / "tokenizer.json").read_text())["model"]
    assert built["vocab"] == shipped["vocab"] and built["merges"] == shipped["merges"]
    assert default_corpus() == default_corpus()


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path / "empty")


def test_load_tokenizer_adds_image_token_and_pad(tmp_path):
    # A Vicuna-like tokenizer: unk/bos/eos but no <image> and no pad token.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        tmp_path
    )
    tok = load_tokenizer(tmp_path)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == 4  # appended after the base vocab; embeddings need no resize (see load_tokenizer)
    assert tok(f"hello {IMAGE_TOKEN} hello", add_special_tokens=False)["input_ids"] == [3, 4, 3]
    assert tok.pad_token == "<unk>" and tok.pad_token_id == 0
