"""Token for token with LLaVA-1.5 for a Llama-family SentencePiece tokenizer (issue 14, section 1).

A small SentencePiece model is trained here with Llama's normaliser settings (BPE, byte fallback, split digits, dummy
prefix, no whitespace collapsing, identity normalisation, unk/bos/eos = 0/1/2) and saved as a Vicuna-like folder
(``tokenizer.model`` + ``tokenizer_config.json``, no ``tokenizer.json``), once with ``legacy: true`` and once with
``legacy: false`` (Vicuna v1.5's own setting). Our side loads it with ``load_tokenizer`` (a fast tokenizer converted
from the SentencePiece model, ``<image>`` added as a special token); LLaVA's side loads it as LLaVA's train.py does
(``AutoTokenizer``, ``use_fast=False``, pad = unk, no ``<image>`` token).

The LLaVA side below is a straight-line restatement of the published algorithm (LLaVA 1.2.x ``llava/train/train.py``
preprocess_multimodal / preprocess_v1 / preprocess_plain, ``llava/mm_utils.py`` tokenizer_image_token, the
``vicuna_v1`` template's get_prompt), written for these tests. LLaVA marks the image with IMAGE_TOKEN_INDEX = -200
where we have a real ``<image>`` id (replaced by the visual features later); the comparison maps one to the other, so
every other id and the place of the image are compared.
"""

import json
from pathlib import Path

import pytest

sentencepiece = pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")  # transformers converts a non-legacy SentencePiece model through protobuf
tokenizers = pytest.importorskip("tokenizers")

from packaging import version  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from lightning_sp.constants import IGNORE_INDEX, IMAGE_TOKEN  # noqa: E402
from lightning_sp.data import conversation  # noqa: E402
from lightning_sp.data.conversation import encode, encode_continuation, encode_prompt  # noqa: E402
from lightning_sp.data.tokenizer import VICUNA_SYSTEM, load_tokenizer  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "tokenizer"

# ----------------------------------------------------------------------------------------------------------------
# LLaVA-1.5's preprocessing, restated
# ----------------------------------------------------------------------------------------------------------------
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
SYSTEM, ROLES, SEP, SEP2 = VICUNA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>"  # conv_vicuna_v1, SeparatorStyle.TWO
PLAIN_SEP = "\n"  # conv_llava_plain
IS_TOKENIZER_GREATER_THAN_0_14 = version.parse(tokenizers.__version__) >= version.parse("0.14")


def llava_tokenizer_image_token(prompt, tokenizer):
    """mm_utils.tokenizer_image_token: every piece between "<image>" tokenised on its own, the first piece's BOS kept
    once, -200 between the pieces."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    input_ids, offset = [], 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    separated = [x for chunk in prompt_chunks for x in (chunk, [IMAGE_TOKEN_INDEX] * (offset + 1))][:-1]
    for x in separated:
        input_ids.extend(x[offset:])
    return input_ids


def llava_preprocess_multimodal(conversations):
    """train.preprocess_multimodal (mm_use_im_start_end off): "<image>" moved to the front of its turn."""
    out = []
    for sentence in conversations:
        value = sentence["value"]
        if DEFAULT_IMAGE_TOKEN in value:
            value = value.replace(DEFAULT_IMAGE_TOKEN, "").strip()
            value = DEFAULT_IMAGE_TOKEN + "\n" + value
            value = value.strip()
        out.append({"from": sentence["from"], "value": value})
    return out


def llava_get_prompt(messages):
    """conversation.Conversation.get_prompt for SeparatorStyle.TWO; a None message is the open assistant turn."""
    seps = [SEP, SEP2]
    ret = SYSTEM + seps[0]
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret


def llava_preprocess_v1(source, tokenizer, has_image):
    """train.preprocess_v1 for one record: (input_ids, labels, zeroed by the "tokenization mismatch" guard)."""
    roles = {"human": ROLES[0], "gpt": ROLES[1]}
    if roles[source[0]["from"]] != ROLES[0]:
        source = source[1:]
    messages = []
    for j, sentence in enumerate(source):
        role = roles[sentence["from"]]
        assert role == ROLES[j % 2]
        messages.append((role, sentence["value"]))
    conversation = llava_get_prompt(messages)

    if has_image:
        input_ids = llava_tokenizer_image_token(conversation, tokenizer)
    else:
        input_ids = tokenizer(conversation, max_length=tokenizer.model_max_length, truncation=True).input_ids
    target = list(input_ids)

    sep = SEP + ROLES[1] + ": "
    total_len = sum(t != tokenizer.pad_token_id for t in target)
    rounds = conversation.split(SEP2)
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        if has_image:
            round_len = len(llava_tokenizer_image_token(rou, tokenizer))
            instruction_len = len(llava_tokenizer_image_token(parts[0], tokenizer)) - 2
        else:
            round_len = len(tokenizer(rou).input_ids)
            instruction_len = len(tokenizer(parts[0]).input_ids) - 2
        if i != 0 and not tokenizer.legacy and IS_TOKENIZER_GREATER_THAN_0_14:  # LLaVA 1.2's non-legacy fix
            round_len -= 1
            instruction_len -= 1
        end = min(cur_len + instruction_len, len(target))
        target[cur_len:end] = [IGNORE_INDEX] * max(end - cur_len, 0)
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * max(len(target) - cur_len, 0)
    zeroed = False
    if cur_len < tokenizer.model_max_length and cur_len != total_len:  # "WARNING: tokenization mismatch"
        target = [IGNORE_INDEX] * len(target)
        zeroed = True
    return input_ids, target, zeroed


def llava_preprocess_plain(source, tokenizer):
    """train.preprocess_plain: "<image>" + caption + "\\n", everything after the image supervised."""
    assert len(source) == 2 and DEFAULT_IMAGE_TOKEN in source[0]["value"]
    conversation = DEFAULT_IMAGE_TOKEN + source[1]["value"] + PLAIN_SEP
    input_ids = llava_tokenizer_image_token(conversation, tokenizer)
    target = list(input_ids)
    tokenized_len = len(llava_tokenizer_image_token(DEFAULT_IMAGE_TOKEN, tokenizer))
    target[:tokenized_len] = [IGNORE_INDEX] * tokenized_len
    return input_ids, target


def llava_sample(record, tokenizer, template):
    """LazySupervisedDataset.__getitem__'s text half: (input_ids, labels, zeroed)."""
    has_image = "image" in record
    source = record["conversations"]
    if has_image:
        source = llava_preprocess_multimodal(source)
    if template == "plain":
        return (*llava_preprocess_plain(source, tokenizer), False)
    return llava_preprocess_v1(source, tokenizer, has_image)


def llava_eval_prompt(record, tokenizer):
    """model_vqa*: the conversation up to the open "ASSISTANT:" turn, through tokenizer_image_token."""
    turns = record["conversations"]
    if turns[-1]["from"] == "gpt":
        turns = turns[:-1]
    if "image" in record:
        turns = llava_preprocess_multimodal(turns)
    messages = [(ROLES[j % 2], t["value"]) for j, t in enumerate(turns)] + [(ROLES[1], None)]
    return llava_tokenizer_image_token(llava_get_prompt(messages), tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# A Llama-like SentencePiece tokenizer, saved as a Vicuna-like folder
# ----------------------------------------------------------------------------------------------------------------
def spm_corpus(kind):
    """Conversation-like text. "vicuna_like": "USER" only ever follows "</s>" (never a space), so "USER" is one piece
    and "▁USER" is not, as in Llama's vocabulary (so a round tokenised alone has one token more than in context:
    the case LLaVA 1.2's non-legacy correction is written for). "user_merged": " USER" is frequent too, so both are
    one piece (LLaVA's correction then miscounts and its guard zeroes every multi-round sample)."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle"]
    lines = [VICUNA_SYSTEM] * 20
    for n, (colour, shape) in enumerate(zip(colours * 3, shapes * 6)):
        turns = (
            f"What color is the {shape}? ASSISTANT: {colour.capitalize()}.</s>"
            f"USER: How many {shape}s are there? ASSISTANT: {n}</s>USER: And now? ASSISTANT: {n * 7 + 3}</s>"
        )
        lines += [
            f"{VICUNA_SYSTEM} USER: {turns}"
            if kind == "user_merged"
            else f"{VICUNA_SYSTEM} {colour}.</s>USER: {turns}",
            f"USER: Is there a {colour} {shape} in the image? ASSISTANT: Yes, there is a {colour} {shape}.</s>"
            if kind == "user_merged"
            else f"Yes.</s>USER: Is there a {colour} {shape} in the image? "
            f"ASSISTANT: Yes, there is a {colour} {shape}.</s>",
            f"A {colour} {shape} on a grid of {n + 2} by {n + 2} cells, {10 * n} pixels wide.",
            f"Describe the image briefly. There are {n} shapes; the {shape} is {colour} and the rest are grey.",
        ]
    lines += [
        "Answer the question using a single word or phrase.",
        "The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks struck 13.",
        "Please answer the following question about this picture, and explain why you think so.",
        "The man is riding a bike down the street, and two dogs are running on the beach at sunset.",
    ] * 3
    return lines


SPM_SETTINGS = dict(  # Llama's normaliser and model settings, a small vocabulary
    model_type="bpe",
    vocab_size=700,
    hard_vocab_limit=False,
    byte_fallback=True,
    split_digits=True,
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    allow_whitespace_only_pieces=True,
    character_coverage=1.0,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    num_threads=1,
    minloglevel=2,
)


@pytest.fixture(scope="module")
def spm_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("spm")
    files = {}
    for kind in ("vicuna_like", "user_merged"):
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(spm_corpus(kind)), model_prefix=str(out / kind), **SPM_SETTINGS
        )
        files[kind] = out / f"{kind}.model"
    return files


def vicuna_folder(root: Path, spm_file: Path, legacy: bool, tokenizer_class: str) -> Path:
    folder = root / f"{spm_file.stem}_legacy_{legacy}_{tokenizer_class}"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(spm_file.read_bytes())
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "legacy": legacy,
                "model_max_length": 2048,
                "pad_token": None,
                "padding_side": "right",
                "sp_model_kwargs": {},
                "tokenizer_class": tokenizer_class,
                "bos_token": {"__type": "AddedToken", "content": "<s>", **special},
                "eos_token": {"__type": "AddedToken", "content": "</s>", **special},
                "unk_token": {"__type": "AddedToken", "content": "<unk>", **special},
            }
        )
    )
    assert not (folder / "tokenizer.json").exists()
    return folder


@pytest.fixture(
    scope="module",
    params=[
        ("vicuna_like", True, "LlamaTokenizer"),
        ("vicuna_like", False, "LlamaTokenizer"),
        ("vicuna_like", False, "LlamaTokenizerFast"),
        ("user_merged", True, "LlamaTokenizer"),
        ("user_merged", False, "LlamaTokenizer"),
    ],
    ids=[
        "vicuna_like-legacy",
        "vicuna_like-nonlegacy",
        "vicuna_like-nonlegacy-fastclass",
        "user_merged-legacy",
        "user_merged-nonlegacy",
    ],
)
def toks(request, spm_files, tmp_path_factory):
    """(ours, LLaVA's, corpus kind) for one folder."""
    kind, legacy, cls = request.param
    folder = vicuna_folder(tmp_path_factory.mktemp("tok"), spm_files[kind], legacy, cls)
    ours = load_tokenizer(folder)
    llava = AutoTokenizer.from_pretrained(str(folder), model_max_length=2048, padding_side="right", use_fast=False)
    llava.pad_token = llava.unk_token  # train.py for the v1 conversation versions
    assert type(ours).__name__ == "LlamaTokenizerFast" and ours.legacy is legacy and llava.legacy is legacy
    # use_fast=False gives the SentencePiece (slow) tokenizer unless the config names the fast class itself.
    assert llava.is_fast is cls.endswith("Fast") and IMAGE_TOKEN not in llava.get_vocab()
    return ours, llava, kind


def rec(*values, image="img.jpg", id="r"):
    record = {"id": id, "conversations": [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]}
    if image is not None:
        record["image"] = image
    return record


VICUNA_RECORDS = {
    "image_multi_turn": rec(
        "<image>\nWhat shape is in the top left?",
        "A circle.",
        "What color is it?",
        "Blue.",
        "Is there a red square?",
        "Yes, there is a red square in the middle.",
    ),
    "image_after_question": rec("What color is the circle?\n<image>", "Red."),
    "image_after_question_multi": rec(
        "How many shapes are there? <image>",
        "There are 3 shapes.",
        "Describe the image briefly.",
        "A red circle and a blue square.",
    ),
    "text_only_multi_turn": rec("Name a colour.", "Purple.", "Another one?", "Orange, or green.", image=None),
    "numeric_answers": rec("<image>\nHow many circles are there?", "2", "And squares?", "10", "Triangles?", "0"),
    "numeric_text_only": rec("What is 3 plus 4?", "7", "And 12 times 10?", "120", image=None),
    "numeric_single_turn": rec("<image>\nHow many shapes are there?", "13"),
    "byte_fallback_answer": rec("<image>\nWhat is written on the sign?", "Ünïcödé 😀 sign\nwith two lines."),
}
PLAIN_RECORDS = {
    "caption": rec("<image>\nDescribe the image briefly.", "A red circle on a grid."),
    "caption_digit_first": rec("Render a clear and concise summary of the photo.\n<image>", "2 dogs on the beach."),
    "caption_lowercase": rec("<image>\nDescribe.", "the man is riding a bike down the street"),
}


def to_ours(ids, image_id):
    return [image_id if t == IMAGE_TOKEN_INDEX else t for t in ids]


def rule_labels(tokenizer, ids, plain=False):
    """Our boundary rule stated on tokens: after the "ASSISTANT:" of each round, through its "</s>" (vicuna_v1);
    everything after "<image>" (plain)."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    labels, inside = [], False
    for i, tid in enumerate(ids):
        labels.append(tid if inside else IGNORE_INDEX)
        if plain:
            inside = inside or tid == image_id
        elif inside:
            inside = tid != tokenizer.eos_token_id
        else:
            inside = tokenizer.decode(ids[: i + 1]).endswith(f"{ROLES[1]}:")
    return labels


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(VICUNA_RECORDS))
def test_vicuna_v1_ids_and_labels_equal_llava(toks, name):
    ours_tok, llava_tok, kind = toks
    record = VICUNA_RECORDS[name]
    image_id = ours_tok.convert_tokens_to_ids(IMAGE_TOKEN)
    ref_ids, ref_labels, zeroed = llava_sample(record, llava_tok, "vicuna_v1")
    enc = encode(record, ours_tok, "vicuna_v1")
    assert enc.input_ids == to_ours(ref_ids, image_id)
    assert enc.input_ids.count(image_id) == ("image" in record)
    # Our boundaries everywhere, LLaVA's guard or not: every answer from the token after "ASSISTANT:" to its </s>.
    assert enc.labels == rule_labels(ours_tok, enc.input_ids)
    if not zeroed:
        assert enc.labels == to_ours(ref_labels, image_id)


@pytest.mark.parametrize("name", sorted(PLAIN_RECORDS))
def test_plain_ids_and_labels_equal_llava(toks, name):
    ours_tok, llava_tok, kind = toks
    record = PLAIN_RECORDS[name]
    image_id = ours_tok.convert_tokens_to_ids(IMAGE_TOKEN)
    ref_ids, ref_labels, _ = llava_sample(record, llava_tok, "plain")
    enc = encode(record, ours_tok, "plain")
    assert enc.input_ids == to_ours(ref_ids, image_id)
    assert enc.labels == to_ours(ref_labels, image_id) == rule_labels(ours_tok, enc.input_ids, plain=True)


@pytest.mark.parametrize("name", sorted(VICUNA_RECORDS))
def test_prompt_ids_equal_llava_eval(toks, name):
    """The one prompt encoder (training's tokenisation; eval, the lmms-eval adapter and runs.py call it) gives
    LLaVA's eval prompt, and training's ids continue it with the last answer."""
    ours_tok, llava_tok, kind = toks
    record = VICUNA_RECORDS[name]
    image_id = ours_tok.convert_tokens_to_ids(IMAGE_TOKEN)
    prompt = encode_prompt(record, ours_tok, "vicuna_v1")
    assert prompt == to_ours(llava_eval_prompt(record, llava_tok), image_id)
    full = encode(record, ours_tok, "vicuna_v1").input_ids
    assert full[: len(prompt)] == prompt and full[-1] == ours_tok.eos_token_id
    assert encode_prompt(PLAIN_RECORDS["caption"], ours_tok, "plain") == [ours_tok.bos_token_id, image_id]


def test_continuation_ids_are_the_answer_ids_of_training(toks):
    """Scoring a continuation (eval's loglikelihood, the lmms-eval adapter) uses the ids the answer has in training,
    not the continuation tokenised alone (a legacy tokenizer would give " 2" alone an extra dummy-prefix "▁")."""
    ours_tok, _, _ = toks
    for name in ("numeric_single_turn", "numeric_answers", "image_after_question", "byte_fallback_answer"):
        record = VICUNA_RECORDS[name]
        answer = record["conversations"][-1]["value"]
        prompt = encode_prompt(record, ours_tok, "vicuna_v1")
        full = encode(record, ours_tok, "vicuna_v1").input_ids
        for continuation in (answer, " " + answer):
            assert encode_continuation(record, ours_tok, "vicuna_v1", continuation) == full[len(prompt) : -1], name
    record = PLAIN_RECORDS["caption_digit_first"]
    caption = record["conversations"][1]["value"]
    full = encode(record, ours_tok, "plain").input_ids
    assert encode_continuation(record, ours_tok, "plain", caption + "\n") == full[2:]


def test_known_differences_are_gone(toks):
    """The two differences issue 14 found: the dummy-prefix "▁" LLaVA gets after <image> (non-legacy), and the lone
    "▁" before a digit-initial answer, which LLaVA supervises (both modes)."""
    ours_tok, _, _ = toks
    image_id = ours_tok.convert_tokens_to_ids(IMAGE_TOKEN)
    enc = encode(VICUNA_RECORDS["numeric_single_turn"], ours_tok, "vicuna_v1")
    pieces = ours_tok.convert_ids_to_tokens(enc.input_ids)
    after_image = enc.input_ids.index(image_id) + 1
    assert pieces[after_image] == "▁"  # the "\n" after <image> starts a piece of its own, with a dummy prefix
    supervised = [p for p, label in zip(pieces, enc.labels) if label != IGNORE_INDEX]
    assert supervised == ["▁", "1", "3", "</s>"]
    plain = encode(PLAIN_RECORDS["caption_digit_first"], ours_tok, "plain")
    assert ours_tok.convert_ids_to_tokens(plain.labels[2:4]) == ["▁", "2"]


def test_llava_guard_cases_still_supervised(toks):
    """Where LLaVA's round arithmetic disagrees with its own tokens it zeroes the sample ("tokenization mismatch");
    we keep supervising it (see conversation.encode), with the boundaries of every other sample. With a Llama-like
    vocabulary ("USER" one piece, "▁USER" not) that never happens; where both are one piece, LLaVA 1.2's non-legacy
    correction miscounts every later round, and the guard zeroes every multi-round sample."""
    ours_tok, llava_tok, kind = toks
    zeroed = {name for name, record in VICUNA_RECORDS.items() if llava_sample(record, llava_tok, "vicuna_v1")[2]}
    multi_round = {name for name, record in VICUNA_RECORDS.items() if len(record["conversations"]) > 2}
    assert zeroed == (multi_round if kind == "user_merged" and not llava_tok.legacy else set())
    for name in zeroed:
        enc = encode(VICUNA_RECORDS[name], ours_tok, "vicuna_v1")
        assert enc.num_supervised > 0 and enc.labels == rule_labels(ours_tok, enc.input_ids), name


def test_vocabularies_are_what_the_cases_need(toks):
    ours_tok, _, kind = toks
    vocab = ours_tok.get_vocab()
    assert "USER" in vocab and ("▁USER" in vocab) is (kind == "user_merged")
    assert "▁2" not in vocab and "▁" in vocab  # split digits: " 2" is "▁", "2"


def test_one_pass_where_exact(toks):
    """One tokenizer pass where the text after <image> tokenises as it would alone (legacy Llama, the shipped
    byte-level BPE); LLaVA's per-piece encoding where it does not (non-legacy Llama: no dummy prefix mid-string)."""
    ours_tok, _, _ = toks
    image_id = ours_tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert conversation.one_pass_exact(ours_tok, image_id) is ours_tok.legacy
    shipped = load_tokenizer(SHIPPED)
    assert conversation.one_pass_exact(shipped, shipped.convert_tokens_to_ids(IMAGE_TOKEN))
