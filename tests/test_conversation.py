"""Golden label masks and record validation for lightning_sp.data.conversation.

Expected masks are written two independent ways: (1) the supervised tokens, decoded run by run, must be
exactly the answers with their "</s>"; (2) a mask assembled from hand-written pieces, each tokenised alone
and split where the tokenizer would split anyway (before a space-led word or at a special token).
"""

import pickle
from pathlib import Path

import pytest
import torch

from lightning_sp.constants import IGNORE_INDEX, IMAGE_TOKEN
from lightning_sp.data.conversation import (
    TEMPLATES,
    RecordError,
    encode,
    encode_prompt,
    expand_image_token,
    get_template,
    one_pass_exact,
    reference_answer,
    render_prompt,
    tokenize_pieces,
)
from lightning_sp.data.tokenizer import VICUNA_SYSTEM, load_tokenizer
from lightning_sp.thirdparty.transformers_internals import rust_backend

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "tokenizer"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(SHIPPED)


def rec(*values, image="img.jpg", id="r1"):
    """A record whose turns alternate human/gpt starting with human."""
    record = {"id": id, "conversations": [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]}
    if image is not None:
        record["image"] = image
    return record


def supervised_runs(tok, enc):
    """Decoded maximal runs of supervised tokens."""
    runs, cur = [], []
    for tid, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE_INDEX:
            assert label == tid
            cur.append(tid)
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    return [tok.decode(run) for run in runs]


def from_pieces(tok, pieces):
    """(ids, labels) from (text, supervised) pieces, BOS first."""
    ids, labels = [tok.bos_token_id], [IGNORE_INDEX]
    for text, sup in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if sup else [IGNORE_INDEX] * len(piece)
    return ids, labels


def check(tok, enc, pieces, answers):
    assert supervised_runs(tok, enc) == answers
    assert (enc.input_ids, enc.labels) == from_pieces(tok, pieces)
    assert enc.num_supervised == sum(label != IGNORE_INDEX for label in enc.labels)


def test_vicuna_single_turn_with_image(tok):
    enc = encode(rec("What color is the circle?\n<image>", "Red."), tok, "vicuna_v1")
    # The first answer token carries the separating space (like Llama's "▁Red").
    check(
        tok,
        enc,
        [
            (f"{VICUNA_SYSTEM} USER: ", False),
            (IMAGE_TOKEN, False),
            ("\nWhat color is the circle? ASSISTANT:", False),
            (" Red.</s>", True),
        ],
        [" Red.</s>"],
    )
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert enc.has_image and enc.input_ids.count(image_id) == 1
    assert enc.labels[enc.input_ids.index(image_id)] == IGNORE_INDEX
    assert enc.input_ids[0] == tok.bos_token_id


def test_vicuna_three_turns(tok):
    qa = [
        "<image>\nWhat shape is in the top left?",
        "A circle.",
        "What color is it?",
        "Blue.",
        "How many squares are there?",
        "3",
    ]
    enc = encode(rec(*qa), tok, "vicuna_v1")
    check(
        tok,
        enc,
        [
            (f"{VICUNA_SYSTEM} USER: ", False),
            (IMAGE_TOKEN, False),
            ("\nWhat shape is in the top left? ASSISTANT:", False),
            (" A circle.</s>", True),
            ("USER: What color is it? ASSISTANT:", False),
            (" Blue.</s>", True),
            ("USER: How many squares are there? ASSISTANT:", False),
            (" 3</s>", True),
        ],
        [" A circle.</s>", " Blue.</s>", " 3</s>"],
    )
    assert enc.input_ids.count(tok.eos_token_id) == 3


def test_text_only_record(tok):
    enc = encode(rec("Name a colour.", "Purple.", "Another?", "Orange.", image=None), tok, "vicuna_v1")
    check(
        tok,
        enc,
        [
            (f"{VICUNA_SYSTEM} USER: Name a colour. ASSISTANT:", False),
            (" Purple.</s>", True),
            ("USER: Another? ASSISTANT:", False),
            (" Orange.</s>", True),
        ],
        [" Purple.</s>", " Orange.</s>"],
    )
    assert not enc.has_image and tok.convert_tokens_to_ids(IMAGE_TOKEN) not in enc.input_ids


def test_unusual_answer_characters(tok):
    enc = encode(rec("<image>\nQ?", "(B) élan 😀 <s> A.\n"), tok, "vicuna_v1")
    # "<s>" inside text is the BOS special token, as in LLaVA; it is still part of the answer span.
    assert supervised_runs(tok, enc) == [" (B) élan 😀 <s> A.\n</s>"]


def test_image_moved_to_front_and_prepended(tok):
    front = encode(rec("<image>\nWhat is this?", "A square."), tok, "vicuna_v1")
    after = encode(rec("What is this?\n<image>", "A square."), tok, "vicuna_v1")
    missing = encode(rec("What is this?", "A square."), tok, "vicuna_v1")  # image key, no placeholder
    assert front == after == missing
    assert f"USER: {IMAGE_TOKEN}\nWhat is this? ASSISTANT:" in render_prompt(rec("What is this? <image>"), "vicuna_v1")


@pytest.mark.parametrize(
    "record, reason",
    [
        (
            {"id": "r1", "conversations": [{"from": "gpt", "value": "Hi."}, {"from": "human", "value": "Q?"}]},
            "gpt-first",
        ),
        (rec("<image> <image>\nQ?", "A."), "placeholders"),
        (rec("<image>\nQ?", "A <image>."), "placeholders"),
        (rec(image=None), "empty conversation"),
        ({"id": "r1", "image": "x.jpg"}, "missing 'conversations'"),
        ({"id": "r1", "conversations": "Q? A."}, "missing 'conversations'"),
        ({"id": "r1", "conversations": ["Q?", "A."]}, "turn 0"),
        ({"id": "r1", "conversations": [{"from": "user", "value": "Q?"}]}, "turn 0"),
        ({"id": "r1", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": 3}]}, "turn 1"),
        ({"id": "r1", "conversations": [{"from": "human"}, {"from": "gpt", "value": "A."}]}, "turn 0"),
        ({"id": "r1", "conversations": [{"from": f, "value": "x"} for f in ("human", "human", "gpt")]}, "alternate"),
        (rec("Q?", "A.", "Q2?"), "ends with a human turn"),
        (rec("Q?", " "), "empty answer"),
        (rec("<image>\nQ?", "A.", image=None), "no 'image'"),
        (rec("Q?", "A.", "<image>\nQ2?", "A2."), "first human turn"),
    ],
)
def test_record_errors(tok, record, reason):
    with pytest.raises(RecordError) as info:
        encode(record, tok, "vicuna_v1")
    assert reason in info.value.reason
    assert info.value.record_id == "r1" and "'r1'" in str(info.value) and "fix:" in str(info.value)


def test_record_error_non_dict_and_pickle(tok):
    with pytest.raises(RecordError, match="not a dict"):
        encode(["Q?", "A."], tok, "vicuna_v1")
    err = pickle.loads(pickle.dumps(RecordError("r9", "too long", "raise max_length")))
    assert (err.record_id, err.reason, str(err)) == ("r9", "too long", "record 'r9': too long (fix: raise max_length)")


def test_plain_template(tok):
    enc = encode(rec("<image>\nDescribe the image briefly.", "A red circle."), tok, "plain")
    # The instruction is dropped; caption and the trailing "\n" are supervised, no </s>.
    check(tok, enc, [(IMAGE_TOKEN, False), ("A red circle.\n", True)], ["A red circle.\n"])
    assert render_prompt(rec("<image>\nDescribe."), "plain") == IMAGE_TOKEN
    for bad in (rec("Describe.", "A circle.", image=None), rec("<image>\nQ?", "A.", "Q?", "A.")):
        with pytest.raises(RecordError, match="plain template"):
            encode(bad, tok, "plain")


def test_max_length_truncation(tok):
    record = rec("<image>\nWhat shape?", "A circle.", "And the colour?", "Green.")
    full = encode(record, tok, "vicuna_v1")
    first_eos = full.input_ids.index(tok.eos_token_id)
    cut = encode(record, tok, "vicuna_v1", max_length=first_eos + 1)  # keeps exactly the first answer
    assert cut.input_ids == full.input_ids[: first_eos + 1] and cut.labels == full.labels[: first_eos + 1]
    assert supervised_runs(tok, cut) == [" A circle.</s>"] and cut.num_supervised >= 1
    assert encode(record, tok, "vicuna_v1", max_length=len(full.input_ids)) == full
    first_sup = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    assert encode(record, tok, "vicuna_v1", max_length=first_sup + 1).num_supervised == 1
    with pytest.raises(RecordError, match="too long") as info:
        encode(record, tok, "vicuna_v1", max_length=first_sup)  # no answer token left
    assert "too long" in info.value.reason
    image_pos = full.input_ids.index(tok.convert_tokens_to_ids(IMAGE_TOKEN))
    with pytest.raises(RecordError, match="cuts <image>"):
        encode(record, tok, "vicuna_v1", max_length=image_pos)


def test_expand_image_token(tok):
    ids, labels = expand_image_token([1, 7, 4, 8, 9], [-100, -100, -100, 8, 9], image_token_id=4, num_visual_tokens=3)
    assert ids.tolist() == [1, 7, 4, 4, 4, 8, 9] and labels.tolist() == [-100] * 5 + [8, 9]
    assert ids.dtype == labels.dtype == torch.long
    text_ids = torch.tensor([1, 7, 8])
    out_ids, out_labels = expand_image_token(text_ids, torch.tensor([-100, 7, 8]), 4, 582)
    assert out_ids.tolist() == [1, 7, 8] and out_labels.tolist() == [-100, 7, 8] and out_ids is not text_ids
    with pytest.raises(ValueError, match="at most one"):
        expand_image_token([4, 4], [-100, -100], 4, 2)
    enc = encode(rec("<image>\nQ?", "A."), tok, "vicuna_v1")
    ids, labels = expand_image_token(enc.input_ids, enc.labels, tok.convert_tokens_to_ids(IMAGE_TOKEN), 582)
    assert len(ids) == len(enc.input_ids) + 581 and (labels != IGNORE_INDEX).sum() == enc.num_supervised


@pytest.mark.parametrize(
    "ids, labels",
    [
        ([1, 7, 4, 8, 9], [-100, -100, -100, 8, 9]),  # image in the middle
        ([4, 8, 9], [-100, 8, 9]),  # first
        ([1, 8, 4], [-100, 8, -100]),  # last
        ([4], [-100]),  # alone
        ([1, 7, 8], [-100, 7, 8]),  # text only
        ([], []),
    ],
)
def test_expand_image_token_lists_equal_the_tensor_path(ids, labels):
    """encode() hands lists, which take a numpy path: the very tensors the tensor path makes, dtype included."""
    for n in (1, 3, 582):
        got = expand_image_token(ids, labels, 4, n)
        ref = expand_image_token(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), 4, n)
        for a, b in zip(got, ref):
            assert a.dtype == b.dtype == torch.long and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize(
    "ids, labels, n, match",
    [
        ([4, 1, 4], [-100] * 3, 2, "2 image tokens"),
        ([1, 4], [-100, -100], 0, "num_visual_tokens must be >= 1"),
        ([1, 4], [-100], 2, "equal length"),
        ([[1, 4]], [[-100, -100]], 2, "1-D"),
    ],
)
def test_expand_image_token_lists_raise_like_tensors(ids, labels, n, match):
    with pytest.raises(ValueError, match=match):
        expand_image_token(ids, labels, 4, n)


TOKENIZE_TEXTS = [
    "",
    " ",
    "Hello",
    "(B) élan 😀 <s> A.\n",
    "tab\tnew\nline\r\n  two  spaces ",
    "日本語のテキスト",
    "e\u0301 combining",
    "<image><image></s></s><pad><unk>",
    "x" * 3000,
    f"{VICUNA_SYSTEM} USER: {IMAGE_TOKEN}\nWhat? ASSISTANT: A red circle.</s>USER: Why? ASSISTANT: So.</s>",
]


def tokenize(tokenizer, text: str, offsets: bool = True):
    """The tokenizer call the conversation code makes (directly on the Rust backend where it can), through the public
    tokenize_pieces: one call per piece between <image> placeholders, so one call for a text without one."""
    return tokenize_pieces(tokenizer, text, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), offsets)


def test_direct_tokenizer_call_is_the_transformers_call(tok):
    """encode() calls the Rust tokenizer itself, skipping transformers' Python layers: the same ids and offsets
    (texts with <image> are tokenised piece by piece here, which the shipped tokenizer's one pass equals, see
    test_shipped_tokenizer_keeps_one_pass)."""
    assert rust_backend(tok) is tok._tokenizer
    for text in TOKENIZE_TEXTS:
        ref = tok(text, return_offsets_mapping=True, add_special_tokens=True)
        assert tokenize(tok, text) == (ref["input_ids"], ref["offset_mapping"])
        assert tokenize(tok, text, offsets=False) == (ref["input_ids"], None)


def test_direct_tokenizer_call_steps_aside_where_it_could_differ(tok):
    fresh = load_tokenizer(SHIPPED)
    text = "A red circle on the left. " * 10
    fresh._tokenizer.enable_truncation(8)  # state transformers resets before encoding; a direct call would keep it
    assert rust_backend(fresh) is None
    assert tokenize(fresh, text)[0] == tok(text)["input_ids"]  # went through transformers: untruncated, as before
    assert rust_backend(fresh) is fresh._tokenizer  # which turned the truncation off again
    fresh.model_max_length = 10  # transformers' one-time warning about over-long sequences is still recorded
    assert tokenize(fresh, text)[0] == tok(text)["input_ids"]
    assert fresh.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum")
    fresh.split_special_tokens = True
    assert rust_backend(fresh) is None and tokenize(fresh, "<s> x</s>")[0] == fresh("<s> x</s>")["input_ids"]
    fresh.split_special_tokens = False

    class Custom(type(tok)):  # a tokenizer class that changes the encode path: always through transformers
        def _batch_encode_plus(self, *args, **kwargs):
            out = super()._batch_encode_plus(*args, **kwargs)
            out["input_ids"] = [[7] + ids for ids in out["input_ids"]]
            return out

    fresh.__class__ = Custom
    assert rust_backend(fresh) is None and tokenize(fresh, "Hi")[0] == [7] + tok("Hi")["input_ids"]
    assert encode(rec("<image>\nQ?", "A."), fresh, "vicuna_v1").input_ids[0] == 7


def test_prompt_matches_training_encoding(tok):
    record = rec("<image>\nWhat shape?", "A circle.", "Where is it?", "Top left.")
    prompt = render_prompt(record, "vicuna_v1")
    assert prompt == (
        f"{VICUNA_SYSTEM} USER: {IMAGE_TOKEN}\nWhat shape? ASSISTANT: A circle.</s>USER: Where is it? ASSISTANT:"
    )
    assert reference_answer(record) == "Top left."
    ids = encode_prompt(record, tok, "vicuna_v1")
    assert ids == tok(prompt)["input_ids"] and ids.count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == 1
    # Generation continues exactly where training's supervised answer begins.
    answer = tok(" Top left.</s>", add_special_tokens=False)["input_ids"]
    assert encode(record, tok, "vicuna_v1").input_ids == ids + answer
    open_ended = rec("<image>\nWhat shape?")
    assert render_prompt(open_ended, "vicuna_v1").endswith("USER: <image>\nWhat shape? ASSISTANT:")
    assert reference_answer(open_ended) is None


def test_template_registry(tok):
    assert set(TEMPLATES) == {"plain", "vicuna_v1", "llama3", "qwen2"}  # the last two: tests/test_llm_backbones.py
    assert get_template("vicuna_v1") is TEMPLATES["vicuna_v1"] and get_template(TEMPLATES["plain"]).plain
    with pytest.raises(KeyError, match="plain.*vicuna_v1"):
        get_template("vicuna")


def test_answer_span_starts_at_the_space_after_the_colon(tok):
    """LLaVA supervises every token after "ASSISTANT:" (its instruction length is len(tokens("... ASSISTANT: ")) - 2):
    a space that the tokenizer keeps as a token of its own before the answer is supervised too."""
    enc = encode(rec("<image>\nQ?", "\nTwo lines."), tok, "vicuna_v1")
    assert supervised_runs(tok, enc) == [" \nTwo lines.</s>"]
    colon = tok(" ASSISTANT:", add_special_tokens=False)["input_ids"]
    ids = enc.input_ids
    end_of_colon = next(i + len(colon) for i in range(len(ids)) if ids[i : i + len(colon)] == colon)
    assert enc.labels[:end_of_colon] == [IGNORE_INDEX] * end_of_colon and enc.labels[end_of_colon] != IGNORE_INDEX


def test_shipped_tokenizer_keeps_one_pass(tok):
    """The byte-level BPE tokenises the text after <image> as it would alone, so one tokenizer pass is LLaVA's
    piece-by-piece tokenizer_image_token: ids and offsets alike."""
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert one_pass_exact(tok, image_id)
    for text in TOKENIZE_TEXTS + [IMAGE_TOKEN, f"{IMAGE_TOKEN}A red circle.\n", f"x {IMAGE_TOKEN}\n3 {IMAGE_TOKEN}"]:
        one_pass = tok(text, return_offsets_mapping=True, add_special_tokens=True)
        assert tokenize_pieces(tok, text, image_id) == (one_pass["input_ids"], one_pass["offset_mapping"])

    class Counting(type(tok)):  # overrides the call, so the conversation code goes through it, not the backend
        calls: list = []

        def __call__(self, text, *args, **kwargs):
            self.calls.append(text)
            return super().__call__(text, *args, **kwargs)

    counting = load_tokenizer(SHIPPED)
    counting.__class__ = Counting
    assert rust_backend(counting) is None and one_pass_exact(counting, image_id)  # probed (and cached) here
    Counting.calls.clear()
    record = rec("<image>\nWhat shape?", "A circle.", "Where?", "Top left.")
    enc = encode(record, counting, "vicuna_v1")
    calls = Counting.calls
    assert len(calls) == 1 and IMAGE_TOKEN in calls[0]  # one pass over the whole conversation
    assert enc.input_ids == encode(record, tok, "vicuna_v1").input_ids
    assert encode_prompt(record, tok, "vicuna_v1") == enc.input_ids[: len(encode_prompt(record, tok, "vicuna_v1"))]


@pytest.fixture(scope="module")
def first_only_tok(tmp_path_factory):
    """A SentencePiece-style tokenizer built with `tokenizers` alone: Metaspace with prepend_scheme="first", as
    transformers converts a non-legacy Llama tokenizer (a "▁" at the start of the string only, none after <image>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    raw.train_from_iterator(
        [f"{VICUNA_SYSTEM} USER: What shape is it? ASSISTANT: A red circle.</s>USER: Where? ASSISTANT: Top left.</s>"]
        * 4,
        trainer,
    )
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out = tmp_path_factory.mktemp("first_only")
    fast.save_pretrained(str(out))
    return load_tokenizer(out)


def test_text_after_image_tokenised_alone_where_one_pass_differs(first_only_tok):
    """Such a tokenizer gives the text after <image> no "▁" in one pass; LLaVA tokenises that text alone (with it).
    encode and encode_prompt fall back to the piece-by-piece encoding, and the labels follow the same spans."""
    from lightning_sp.data import conversation

    tok = first_only_tok
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert not conversation.one_pass_exact(tok, image_id)
    record = rec("<image>\nWhat shape is it?", "A red circle.", "Where?", "Top left.")
    text = render_prompt(record, "vicuna_v1") + " Top left.</s>"
    before, after = text.split(IMAGE_TOKEN)
    expected = tok(before)["input_ids"] + [image_id] + tok(after)["input_ids"][1:]  # tokenizer_image_token
    assert tok.convert_ids_to_tokens(tok(after)["input_ids"][1]) == "▁"  # the dummy prefix one pass lacks
    enc = encode(record, tok, "vicuna_v1")
    assert enc.input_ids == expected and enc.input_ids != tok(text)["input_ids"]
    prompt = encode_prompt(record, tok, "vicuna_v1")
    assert prompt == expected[: len(prompt)] and len(prompt) < len(expected)
    supervised = tok.convert_ids_to_tokens([t for t in enc.labels if t != IGNORE_INDEX])
    assert "".join(supervised) == "▁A▁red▁circle.</s>▁Top▁left.</s>"
    plain = encode(rec("<image>\nDescribe.", "A red circle."), tok, "plain")
    assert plain.input_ids[:2] == [tok.bos_token_id, image_id]
    assert tok.convert_ids_to_tokens(plain.input_ids[2]).startswith("▁")
    assert plain.labels[:2] == [IGNORE_INDEX] * 2 and IGNORE_INDEX not in plain.labels[2:]
