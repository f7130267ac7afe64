"""Conversation templates and label masks for LLaVA-format records.

A record is ``{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}``.

Token ids are LLaVA-1.5's, token for token (``llava/mm_utils.py`` tokenizer_image_token): the text before and the
text after ``<image>`` are tokenised as separate strings, the second one's BOS dropped, and the ``<image>`` id (LLaVA's
IMAGE_TOKEN_INDEX) put between them. Where a tokenizer tokenises the text after an added token exactly as it would
that text alone (the shipped byte-level BPE, legacy Llama tokenizers), that is one tokenizer pass over the whole
conversation; where it does not (non-legacy Llama tokenizers, such as Vicuna v1.5's: no dummy-prefix "▁" after
``<image>`` mid-string), the pieces are tokenised one by one. :func:`one_pass_exact` decides, once per tokenizer.

Label masks come from char offsets: the conversation is rendered to one string while the char spans of the
assistant answers are recorded (each from the space after ``ASSISTANT:`` through its ``</s>``), and a token is
supervised iff its chars overlap an answer span. These are LLaVA's labels (it masks each round's
``len(tokenize("... ASSISTANT: ")) - 2`` instruction tokens and supervises the rest of the round, so the lone "▁"
before a digit-initial answer is supervised too), computed without LLaVA's round-by-round re-tokenisation. Where
that re-tokenisation disagrees with the conversation's own tokens, LLaVA zeroes the whole sample ("tokenization
mismatch"); offsets cannot disagree with the tokens they describe, so we keep supervising such a sample, with the
same boundaries as every other (a deliberate difference, see :func:`encode`).
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from lightning_sp.constants import IGNORE_INDEX, IMAGE_TOKEN
from lightning_sp.data.tokenizer import VICUNA_SYSTEM
from lightning_sp.thirdparty.transformers_internals import rust_backend, warn_if_too_long

HUMAN, GPT = "human", "gpt"


class RecordError(ValueError):
    """A training record that cannot be used; the dataset layer drops it and counts it under ``code``.

    ``reason`` is the human-readable explanation; ``code`` a short stable name (``gpt_first``, ``too_long``...)
    that skip counts are keyed by, so that one cause with varying details is one count.
    """

    def __init__(self, record_id, reason: str, fix: str = "", code: str = ""):
        self.record_id, self.reason, self.fix = record_id, reason, fix
        self.code = code or reason.split(":")[0]
        super().__init__(f"record {record_id!r}: {reason}" + (f" (fix: {fix})" if fix else ""))

    def __reduce__(self):  # exceptions travel between DataLoader worker processes by pickle
        return type(self), (self.record_id, self.reason, self.fix, self.code)


@dataclass(frozen=True)
class Template:
    """A conversation format. ``plain`` is LLaVA's align-stage format (no system prompt, no roles)."""

    name: str
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "  # after the system prompt and after each human turn
    sep2: str = "</s>"  # after each answer: the end-of-turn token the model must learn to emit
    plain: bool = False

    def render(self, turns: list[tuple[str, str]], prompt_only: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """Render validated ``(role, text)`` turns. Returns the text and the char spans to supervise.

        With ``prompt_only`` the turns must end with a human turn and the text ends where the model's
        answer would begin (after ``ASSISTANT:``); no spans are returned.
        """
        if self.plain:
            # LLaVA preprocess_plain: the human text (an instruction) is replaced by the bare image token.
            if prompt_only:
                return IMAGE_TOKEN, []
            text = IMAGE_TOKEN + turns[1][1] + self.sep
            return text, [(len(IMAGE_TOKEN), len(text))]
        user, assistant = self.roles
        text, spans = self.system + self.sep, []
        for role, value in turns:
            if role == HUMAN:
                text += f"{user}: {value}{self.sep}"
            else:
                # The answer's span starts at the space after "ASSISTANT:": LLaVA supervises everything after
                # the ":" token, which, with a SentencePiece tokenizer, includes a lone "▁" before an answer that
                # starts with a digit ("▁", "2", "</s>"); the model must learn to emit it.
                text += f"{assistant}:"
                start = len(text)
                text += f" {value}{self.sep2}"
                spans.append((start, len(text)))
        if prompt_only:
            text += f"{assistant}:"  # LLaVA's get_prompt for an empty last message: no trailing space
            spans = []
        return text, spans

    @property
    def question_markers(self) -> tuple[str, str]:
        """The text just before and just after a human turn's question in a rendered prompt (special tokens
        kept): what :func:`lightning_sp.viz.question_text` cuts the last question out by."""
        user, assistant = self.roles
        return (f"{user}:", f"{assistant}:") if user else ("", "")


@dataclass(frozen=True)
class MarkupTemplate:
    """A chat format whose turns are wrapped in special-token markup (Llama-3 chat, Qwen2 chat/ChatML): the text
    its model's own chat template (``tokenizer.chat_template``) renders, without the BOS the tokenizer adds.

    Each turn is ``header.format(role=...) + text + end_of_turn + after_turn``. An answer's supervised span is its
    text through ``end_of_turn`` (what the model must emit to stop; ``after_turn``, Qwen's newline, is not).
    ``trim``: the content is stripped of surrounding whitespace (Llama-3's template does ``| trim``). An empty
    ``system`` writes no system turn."""

    name: str
    header: str
    end_of_turn: str
    system: str = ""
    after_turn: str = ""
    trim: bool = False
    roles: tuple[str, str] = ("user", "assistant")
    plain = False

    @property
    def sep2(self) -> str:  # the end-of-turn token, as Template names it (checked to be a special token)
        return self.end_of_turn

    def render(self, turns: list[tuple[str, str]], prompt_only: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """As :meth:`Template.render`: the text and the char spans to supervise (none with ``prompt_only``, which
        ends with the assistant header where the answer begins)."""
        user, assistant = self.roles
        role_names = {"system": "system", HUMAN: user, GPT: assistant}
        system = [("system", self.system)] if self.system else []  # an empty system prompt writes no turn
        text, spans = "", []
        for role, value in system + list(turns):
            text += self.header.format(role=role_names[role])
            start = len(text)
            text += (value.strip() if self.trim else value) + self.end_of_turn
            if role == GPT:
                spans.append((start, len(text)))
            text += self.after_turn
        if prompt_only:
            text += self.header.format(role=assistant)
            spans = []
        return text, spans

    @property
    def question_markers(self) -> tuple[str, str]:
        return self.header.format(role=self.roles[0]), self.end_of_turn


TEMPLATES: dict[str, Template | MarkupTemplate] = {
    "plain": Template("plain", system="", roles=("", ""), sep="\n", sep2="", plain=True),
    "vicuna_v1": Template("vicuna_v1", system=VICUNA_SYSTEM),
    # Llama-3 Instruct's chat template: no default system prompt, contents trimmed, <|eot_id|> ends every turn.
    "llama3": MarkupTemplate(
        "llama3", header="<|start_header_id|>{role}<|end_header_id|>\n\n", end_of_turn="<|eot_id|>", trim=True
    ),
    # Qwen2 Instruct's (ChatML): a default system prompt, <|im_end|> then a newline after every turn.
    "qwen2": MarkupTemplate(
        "qwen2",
        header="<|im_start|>{role}\n",
        end_of_turn="<|im_end|>",
        after_turn="\n",
        system="You are a helpful assistant.",
    ),
}


def register_template(template: Template | MarkupTemplate) -> Template | MarkupTemplate:
    """Make a conversation format known by its ``name`` (an LLM backbone's ``chat_format``, `stage.template`);
    a name is registered once."""
    if not isinstance(template, (Template, MarkupTemplate)):
        raise TypeError(f"register_template takes a Template or MarkupTemplate, got {type(template).__name__}")
    if template.name in TEMPLATES:
        raise ValueError(f"conversation template {template.name!r} registered twice")
    TEMPLATES[template.name] = template
    return template


def get_template(name: str | Template | MarkupTemplate) -> Template | MarkupTemplate:
    if isinstance(name, (Template, MarkupTemplate)):
        return name
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown conversation template {name!r}; valid: {sorted(TEMPLATES)}") from None


@dataclass
class Encoded:
    input_ids: list[int]  # contains the single <image> placeholder id when has_image
    labels: list[int]  # IGNORE_INDEX where not supervised
    has_image: bool
    num_supervised: int


def _parse(record, template: Template, need_answer: bool) -> tuple[list[tuple[str, str]], bool]:
    """Validate a record and return its turns, ``<image>`` moved to the front of the first human turn."""
    rid = record.get("id", "<no id>") if isinstance(record, dict) else "<not a dict>"

    def fail(code: str, reason: str, fix: str = "") -> RecordError:
        return RecordError(rid, reason, fix, code)

    if not isinstance(record, dict):
        raise fail("malformed", f"record is a {type(record).__name__}, not a dict", "use the LLaVA JSON format")
    convs = record.get("conversations")
    if not isinstance(convs, list):
        raise fail(
            "malformed", "missing 'conversations' list", "add 'conversations': [{'from': 'human', 'value': ...}, ...]"
        )
    if not convs:
        raise fail("empty_conversation", "empty conversation", "drop the record")
    for i, turn in enumerate(convs):
        if not (isinstance(turn, dict) and turn.get("from") in (HUMAN, GPT) and isinstance(turn.get("value"), str)):
            raise fail(
                "malformed", f"turn {i} is not {{'from': 'human'|'gpt', 'value': str}}", "fix the turn's keys/types"
            )
        if not _is_unicode(turn["value"]):
            # A "\ud800" escape in the JSON decodes to a lone surrogate, which the tokenizer cannot take.
            raise fail(
                "not_utf8",
                f"turn {i} holds an unpaired UTF-16 surrogate (not valid Unicode)",
                "repair the text's encoding",
            )
    if convs[0]["from"] == GPT:
        # LLaVA drops these too: the answer would have no question to condition on.
        raise fail("gpt_first", "gpt-first conversation", "drop the leading gpt turn or the record")
    for i, turn in enumerate(convs):
        if turn["from"] != (HUMAN if i % 2 == 0 else GPT):
            raise fail("roles", f"roles do not alternate human/gpt at turn {i}", "merge or remove consecutive turns")
        if turn["from"] == GPT and not turn["value"].strip():
            raise fail("empty_answer", f"empty answer at turn {i}", "remove the empty round")
    if need_answer and convs[-1]["from"] != GPT:
        raise fail("no_answer", "conversation ends with a human turn (nothing to supervise)", "remove the last turn")

    n_image = sum(turn["value"].count(IMAGE_TOKEN) for turn in convs)
    has_image = bool(record.get("image"))
    if n_image > 1:
        raise fail(
            "multiple_images", f"{n_image} {IMAGE_TOKEN} placeholders; one image per record is supported", "keep one"
        )
    if n_image == 1 and IMAGE_TOKEN not in convs[0]["value"]:
        raise fail("image_token", f"{IMAGE_TOKEN} is not in the first human turn", "move it into the first human turn")
    if n_image == 1 and not has_image:
        raise fail(
            "image_token", f"text contains {IMAGE_TOKEN} but the record has no 'image'", "add 'image' or drop the token"
        )

    turns = [(turn["from"], turn["value"]) for turn in convs]
    if has_image:
        # Same normalisation as LLaVA's preprocess_multimodal. An image record without the placeholder (LLaVA
        # silently leaves the image out: it is never spliced in) gets one prepended: it is meant to be seen.
        turns[0] = (HUMAN, IMAGE_TOKEN + "\n" + turns[0][1].replace(IMAGE_TOKEN, "").strip())
    if template.plain and not (has_image and len(convs) <= 2):
        raise fail("template", "the plain template needs an image record with one human/gpt pair", "use vicuna_v1")
    return turns, has_image


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_tokenizer(tokenizer, template: Template) -> int:
    """Configuration errors (not record errors): fail loudly once rather than drop every record."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("a fast tokenizer is required (label masks use char offsets)")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id is None or image_id == tokenizer.unk_token_id:
        raise ValueError(
            f"tokenizer has no {IMAGE_TOKEN} token; load it with lightning_sp.data.tokenizer.load_tokenizer"
        )
    if template.sep2 and template.sep2 not in tokenizer.all_special_tokens:
        # Otherwise "</s>" would be split into text pieces and the model would never learn to stop.
        raise ValueError(
            f"template {template.name!r} ends turns with {template.sep2!r}, "
            "which is not a special token of this tokenizer"
        )
    if template.sep2 and tokenizer.eos_token != template.sep2:
        # Generation stops at eos_token_id: a model trained to end its turns with another token would run on.
        raise ValueError(
            f"template {template.name!r} ends turns with {template.sep2!r} but the tokenizer's eos_token is "
            f"{tokenizer.eos_token!r}; use the LLM's own (chat) tokenizer, whose eos is its end-of-turn token"
        )
    if isinstance(template, MarkupTemplate) and getattr(tokenizer, "chat_template", None):
        _check_own_chat_template(tokenizer, template, image_id)
    return image_id


# A conversation every chat format must render as the tokenizer's own template does: an image, two rounds.
_PROBE = {
    "id": "chat-template probe",
    "image": "probe.jpg",
    "conversations": [
        {"from": HUMAN, "value": IMAGE_TOKEN + "\nWhat is left of the red square?"},
        {"from": GPT, "value": "A blue circle."},
        {"from": HUMAN, "value": "How many shapes are there?"},
        {"from": GPT, "value": "3"},
    ],
}
# tokenizer -> the (chat template, format name) pairs already checked
_CHECKED_CHAT_TEMPLATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _check_own_chat_template(tokenizer, template: MarkupTemplate, image_id: int) -> None:
    """The model's own chat template (``tokenizer.chat_template``) decides its format: a chat-markup format
    (Llama-3, Qwen2, or one registered from outside) must render :data:`_PROBE` to the same ids, or the model would
    train and be asked in a format it was never given (a Llama-3.1 template's dated system block, say). Where the
    template marks what an assistant turn emits (HF's ``{% generation %}``), the tokens it marks must be the ones
    we supervise. Checked once per tokenizer, template text and format."""
    checked = _CHECKED_CHAT_TEMPLATES.setdefault(tokenizer, set())
    if (tokenizer.chat_template, template.name) in checked:
        return
    role = {HUMAN: template.roles[0], GPT: template.roles[1]}
    messages = [{"role": role[t["from"]], "content": t["value"]} for t in _PROBE["conversations"]]
    encoded = _encode(_PROBE, tokenizer, template, None, image_id)
    marked = re.search(r"{%-?\s*generation\s*-?%}", tokenizer.chat_template) is not None
    own = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=marked)
    if own["input_ids"] != encoded.input_ids:
        at = next((i for i, (a, b) in enumerate(zip(own["input_ids"], encoded.input_ids)) if a != b), None)
        at = min(len(own["input_ids"]), len(encoded.input_ids)) if at is None else at
        raise ValueError(
            f"the tokenizer's own chat template renders a conversation differently from the {template.name!r} "
            f"format from token {at} on: {tokenizer.decode(own['input_ids'][at : at + 12])!r} (its template) against "
            f"{tokenizer.decode(encoded.input_ids[at : at + 12])!r} ({template.name}). The model's template decides: "
            "register a format that renders as it does (lightning_sp.data.conversation.register_template, named by "
            "an LLM backbone's chat_format), or use the tokenizer whose template this format restates"
        )
    if marked:
        ours = [int(label != IGNORE_INDEX) for label in encoded.labels]
        if own["assistant_masks"] != ours:
            theirs = [t for t, m in zip(own["input_ids"], own["assistant_masks"]) if m]
            mine = [t for t, m in zip(encoded.input_ids, ours) if m]
            raise ValueError(
                f"the tokenizer's chat template marks {tokenizer.decode(theirs)!r} as what the assistant emits "
                f"({{% generation %}}), but the {template.name!r} format supervises {tokenizer.decode(mine)!r}: "
                "mark each answer through its end-of-turn token, or register a format whose answers end as marked"
            )
    checked.add((tokenizer.chat_template, template.name))


def _tokenize(tokenizer, text: str, offsets: bool = True) -> tuple[list[int], list[tuple[int, int]] | None]:
    """``tokenizer(text, add_special_tokens=True)``: (input_ids, char offsets or None), the same numbers."""
    backend = rust_backend(tokenizer)
    if backend is None:
        enc = tokenizer(text, return_offsets_mapping=offsets, add_special_tokens=True)
        return enc["input_ids"], enc["offset_mapping"] if offsets else None
    enc = backend.encode(text, add_special_tokens=True)
    ids = enc.ids
    warn_if_too_long(tokenizer, ids)
    return ids, enc.offsets if offsets else None


def tokenize_pieces(
    tokenizer, text: str, image_id: int, offsets: bool = True
) -> tuple[list[int], list[tuple[int, int]] | None]:
    """LLaVA's ``tokenizer_image_token``: each piece of ``text`` between ``<image>`` placeholders tokenised as a
    string of its own, the first piece's BOS kept once and every piece's first token dropped when the first piece
    starts with BOS, ``image_id`` between the pieces. Offsets are into ``text``; ``<image>`` gets its own chars."""
    pieces = text.split(IMAGE_TOKEN)
    ids, offs = _tokenize(tokenizer, pieces[0], offsets)
    if len(pieces) == 1:
        return ids, offs
    bos = tokenizer.bos_token_id
    drop = 1 if ids and bos is not None and ids[0] == bos else 0
    ids, offs = list(ids), list(offs) if offsets else None
    at = len(pieces[0])  # where the current <image> starts in text
    for piece in pieces[1:]:
        piece_ids, piece_offs = _tokenize(tokenizer, piece, offsets)
        ids.append(image_id)
        ids += piece_ids[drop:]
        shift = at + len(IMAGE_TOKEN)
        if offsets:
            offs.append((at, shift))
            offs += [(start + shift, end + shift) for start, end in piece_offs[drop:]]
        at = shift + len(piece)
    return ids, offs


# A probe of every way text meets <image> in our templates (and a few more): what follows starts with a newline, a
# letter, a space, a digit, a byte-fallback character, nothing; what precedes ends with a space, a letter, nothing.
_PROBES = (
    f"A b USER: {IMAGE_TOKEN}\nWhat is it? ASSISTANT: 2</s>USER: Why? ASSISTANT: So.</s>",
    IMAGE_TOKEN,
    f"{IMAGE_TOKEN}A red circle.\n",
    f"{IMAGE_TOKEN}2 dogs",
    f"x{IMAGE_TOKEN} y",
    f"\u00e9 {IMAGE_TOKEN}\U0001f600",
    f"{IMAGE_TOKEN}\n\n  two",
    f"USER:{IMAGE_TOKEN}</s>x",
)
_ONE_PASS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def one_pass_exact(tokenizer, image_id: int) -> bool:
    """Whether one tokenizer pass over a text with ``<image>`` gives :func:`tokenize_pieces`'s ids and offsets:
    true where the tokenizer treats the text after an added token as the start of a new string (the shipped
    byte-level BPE, legacy Llama tokenizers: a dummy prefix on every piece), false for non-legacy Llama tokenizers
    (their Metaspace pre-tokenizer prepends "▁" at the start of the string only). Probed once per tokenizer."""
    try:
        return _ONE_PASS[tokenizer]
    except (KeyError, TypeError):
        pass
    exact = all(_tokenize(tokenizer, probe) == tokenize_pieces(tokenizer, probe, image_id) for probe in _PROBES)
    try:
        _ONE_PASS[tokenizer] = exact
    except TypeError:  # not weak-referenceable: probe every time
        pass
    return exact


def _tokenize_text(
    tokenizer, text: str, image_id: int, offsets: bool = True
) -> tuple[list[int], list[tuple[int, int]] | None]:
    """The ids (and offsets) of a rendered conversation, LLaVA's ``tokenizer_image_token`` of it: one pass where
    that is exact, piece by piece where not. Training (:func:`encode`) and every prompt (:func:`encode_prompt`: eval,
    the lmms-eval adapter, ``runs.prompt_ids``) tokenise through here."""
    if IMAGE_TOKEN not in text or one_pass_exact(tokenizer, image_id):
        return _tokenize(tokenizer, text, offsets)
    return tokenize_pieces(tokenizer, text, image_id, offsets)


def _check_image(ids: list[int], image_id: int, has_image: bool, rid) -> None:
    count = ids.count(image_id)
    if count != int(has_image):  # e.g. a literal "<image>" the validation could not see
        raise RecordError(
            rid, f"tokenised text has {count} {IMAGE_TOKEN} ids, expected {int(has_image)}", code="image_token"
        )


def encode(record: dict, tokenizer, template: str | Template, max_length: int | None = None) -> Encoded:
    """Tokenise a training record and build its label mask (answers and their end-of-turn supervised).

    The ids are LLaVA-1.5's (preprocess_v1 / preprocess_plain with tokenizer_image_token), and so are the labels
    wherever LLaVA's own "tokenization mismatch" guard leaves a sample alone: each answer is supervised from the
    token after ``ASSISTANT:`` (a lone "▁" before a digit included) through its ``</s>``; ``plain``: everything after
    ``<image>``. Deliberate improvement: where LLaVA's round-by-round length arithmetic disagrees with the
    conversation's tokens (e.g. a round whose standalone tokenisation differs from its tokens in context), LLaVA sets
    every label of the sample to IGNORE and the sample teaches nothing; we supervise it, with the same boundaries as
    every other sample, since our spans come from the conversation's own token offsets.

    ``max_length`` counts the ``<image>`` placeholder as one token; to bound the sequence after visual
    expansion pass ``max_length - (num_visual_tokens - 1)``. Raises :class:`RecordError` for unusable records.
    """
    return RecordEncoder(tokenizer, template)(record, max_length)


class RecordEncoder:
    """:func:`encode` for many records: the template is looked up and the tokenizer checked once, when it is made
    (configuration errors raise here, before any record)."""

    def __init__(self, tokenizer, template: str | Template) -> None:
        self.tokenizer, self.template = tokenizer, get_template(template)
        self.image_id = check_tokenizer(tokenizer, self.template)

    def __call__(self, record: dict, max_length: int | None = None) -> Encoded:
        return _encode(record, self.tokenizer, self.template, max_length, self.image_id)


def _encode(record: dict, tokenizer, tpl: Template, max_length: int | None, image_id: int) -> Encoded:
    """:func:`encode` once the tokenizer has passed :func:`check_tokenizer` (``image_id``: what it returned)."""
    turns, has_image = _parse(record, tpl, need_answer=True)
    rid = record.get("id", "<no id>")
    text, spans = tpl.render(turns)

    ids, offsets = _tokenize_text(tokenizer, text, image_id)
    supervised = bytearray(len(text) + 1)  # 1 for every char inside an answer span (and a 0 past the end)
    for start, end in spans:
        supervised[start:end] = b"\x01" * (end - start)
    # A token with chars is supervised iff they overlap a span. A zero-width token (a dummy-prefix "▁" that a
    # SentencePiece tokenizer adds at the start of a piece) is supervised iff the char it stands before is; BOS, at
    # char 0 where no span starts, never is.
    find = supervised.find
    labels = [
        tid if (find(1, start, end) != -1 if end > start else supervised[start]) else IGNORE_INDEX
        for tid, (start, end) in zip(ids, offsets)
    ]
    _check_image(ids, image_id, has_image, rid)

    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        ids, labels = ids[:max_length], labels[:max_length]
        if has_image and image_id not in ids:
            raise RecordError(
                rid,
                f"too long: truncation to {max_length} tokens cuts {IMAGE_TOKEN}",
                "raise max_length or drop the record",
                "too_long",
            )
    num_supervised = len(labels) - labels.count(IGNORE_INDEX)
    if num_supervised == 0:  # never hand the model a sample whose labels are all IGNORE_INDEX
        if truncated:
            raise RecordError(
                rid,
                f"too long: no supervised token within {max_length} tokens",
                "raise max_length or drop the record",
                "too_long",
            )
        raise RecordError(rid, "no supervised tokens", "drop the record", "no_supervised")
    return Encoded(ids, labels, has_image, num_supervised)


def expand_image_token(
    input_ids, labels, image_token_id: int, num_visual_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat the single ``<image>`` id ``num_visual_tokens`` times (labels IGNORE_INDEX there).

    Returns new 1-D LongTensors; text-only samples come back unchanged (as copies).
    """
    if type(input_ids) is list and type(labels) is list:  # what encode() returns: built in numpy, 3x faster
        expanded = _expand_lists(input_ids, labels, image_token_id, num_visual_tokens)
        if expanded is not None:
            return expanded
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    lab = torch.as_tensor(labels, dtype=torch.long)
    if ids.dim() != 1 or ids.shape != lab.shape:
        raise ValueError(
            f"expected 1-D input_ids and labels of equal length, got {tuple(ids.shape)} and {tuple(lab.shape)}"
        )
    positions = (ids == image_token_id).nonzero().flatten()
    if positions.numel() == 0:
        return ids.clone(), lab.clone()
    if positions.numel() > 1:
        raise ValueError(f"{positions.numel()} image tokens; expected at most one")
    if num_visual_tokens < 1:
        raise ValueError(f"num_visual_tokens must be >= 1, got {num_visual_tokens}")
    p = int(positions[0])
    fill_ids = ids.new_full((num_visual_tokens,), image_token_id)
    fill_lab = lab.new_full((num_visual_tokens,), IGNORE_INDEX)
    return torch.cat([ids[:p], fill_ids, ids[p + 1 :]]), torch.cat([lab[:p], fill_lab, lab[p + 1 :]])


def _expand_lists(input_ids: list, labels: list, image_token_id: int, num_visual_tokens: int):
    """:func:`expand_image_token` for lists of ints: the same tensors, or None for anything else (other element
    types, several image tokens...), which the tensor path then handles and reports as before."""
    ids, lab = np.asarray(input_ids), np.asarray(labels)
    if (
        ids.dtype.kind not in "ib"
        or lab.dtype.kind not in "ib"
        or ids.ndim != 1
        or ids.shape != lab.shape
        or type(image_token_id) is not int
    ):
        return None
    ids, lab = ids.astype(np.int64, copy=False), lab.astype(np.int64, copy=False)
    positions = np.flatnonzero(ids == image_token_id)
    if len(positions) == 0:
        return torch.from_numpy(ids), torch.from_numpy(lab)
    if len(positions) > 1 or num_visual_tokens < 1:
        return None
    p = int(positions[0])
    end = p + num_visual_tokens  # where the text after <image> goes
    out_ids = np.empty(len(ids) + num_visual_tokens - 1, np.int64)
    out_lab = np.empty_like(out_ids)
    out_ids[:p], out_ids[p:end], out_ids[end:] = ids[:p], image_token_id, ids[p + 1 :]
    out_lab[:p], out_lab[p:end], out_lab[end:] = lab[:p], IGNORE_INDEX, lab[p + 1 :]
    return torch.from_numpy(out_ids), torch.from_numpy(out_lab)


def _prompt_turns(record, tpl: Template) -> tuple[list[tuple[str, str]], bool]:
    turns, has_image = _parse(record, tpl, need_answer=False)
    if turns[-1][0] == GPT:
        turns = turns[:-1]  # the last answer is the reference, not part of the prompt
    return turns, has_image


def render_prompt(record: dict, template: str | Template) -> str:
    """The conversation up to and including the ``ASSISTANT:`` of the last human turn (for generation)."""
    tpl = get_template(template)
    return tpl.render(_prompt_turns(record, tpl)[0], prompt_only=True)[0]


def encode_prompt(record: dict, tokenizer, template: str | Template) -> list[int]:
    """Token ids of :func:`render_prompt` (BOS first, one ``<image>`` id for image records): LLaVA's eval prompt
    (``tokenizer_image_token`` of the conversation up to ``ASSISTANT:``), tokenised as training tokenises.

    The one function that builds prompt ids: the datamodule's eval fields, ``evaluate`` (and through it the lmms-eval
    adapter) and ``runs.prompt_ids`` all call it."""
    tpl = get_template(template)
    image_id = check_tokenizer(tokenizer, tpl)
    turns, has_image = _prompt_turns(record, tpl)
    ids = _tokenize_text(tokenizer, tpl.render(turns, prompt_only=True)[0], image_id, offsets=False)[0]
    _check_image(ids, image_id, has_image, record.get("id", "<no id>"))
    return ids


def expanded_prompt_ids(record: dict, tokenizer, template: str | Template, num_visual_tokens: int) -> torch.Tensor:
    """:func:`encode_prompt` with the ``<image>`` id repeated ``num_visual_tokens`` times: what the model reads
    (validation prompts, ``evaluate``, ``runs.prompt_ids``)."""
    ids = encode_prompt(record, tokenizer, template)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return expand_image_token(ids, [IGNORE_INDEX] * len(ids), image_id, num_visual_tokens)[0]


def encode_continuation(record: dict, tokenizer, template: str | Template, continuation: str) -> list[int]:
    """The ids of ``continuation`` (an answer to score) after :func:`encode_prompt`'s: the prompt with the
    continuation appended, tokenised as training tokenises an answer in context, less the prompt's ids (lm-eval's
    convention). A continuation without leading whitespace gets the space that follows ``ASSISTANT:`` in
    ``vicuna_v1`` (none in ``plain``). Tokenising the continuation alone would differ with SentencePiece tokenizers:
    a legacy Llama tokenizer gives " 2" alone a dummy prefix ("▁", "▁", "2") that it never has after the prompt."""
    tpl = get_template(template)
    image_id = check_tokenizer(tokenizer, tpl)
    turns, _ = _prompt_turns(record, tpl)
    prompt_text = tpl.render(turns, prompt_only=True)[0]
    if continuation and not continuation[0].isspace() and not tpl.plain:
        continuation = " " + continuation
    prompt = _tokenize_text(tokenizer, prompt_text, image_id, offsets=False)[0]
    return list(_tokenize_text(tokenizer, prompt_text + continuation, image_id, offsets=False)[0][len(prompt) :])


def reference_answer(record: dict) -> str | None:
    """The last turn's answer (the generation target), or None when the record ends with a question."""
    convs = record.get("conversations") if isinstance(record, dict) else None
    if not convs or not isinstance(convs[-1], dict) or convs[-1].get("from") != GPT:
        return None
    return convs[-1].get("value")
