"""Evaluation metrics as torchmetrics ``Metric`` subclasses: VQA accuracy, exact match, POPE.

Every state is a summed tensor (``dist_reduce_fx="sum"``), so the metrics reduce correctly across ranks and
``merge_state`` combines shards evaluated apart. Inputs are lists of strings: predictions as generated,
references as in the benchmark files.

* :class:`VQAAccuracy` -- the VQAv2 soft accuracy: answers normalised as the official VQA evaluation does
  (punctuation, number words -> digits, articles, contractions); a prediction scores
  ``min(#humans that gave it / 3, 1)`` averaged over the 10 leave-one-out subsets of 9 human answers. With a
  single reference answer the score is plain (normalised) exact match.
* :class:`ExactMatch` -- normalised string equality with any reference (the training module's val accuracy).
* :class:`POPEMetrics` -- yes/no hallucination probing: answers parsed as LLaVA's ``eval_pope.py`` does
  (first sentence; "no"/"No"/"not" among its words means no, anything else yes), then accuracy, precision,
  recall, F1 and the yes-ratio with "yes" as the positive class.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence, Union

import torch
from torchmetrics import Metric

from lightning_sp.data.answers import normalize_answer

References = Union[str, Sequence[str]]

# ---- VQAv2 answer normalisation (the official VQA evaluation's processPunctuation + processDigitArticle) ----

_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset(("a", "an", "the"))
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")

# The contraction forms the VQA evaluation restores. Its table maps each form written without one of its
# apostrophes (all of them for single-apostrophe words: "dont" -> "don't"; one at a time otherwise:
# "couldnt've" and "couldn'tve" -> "couldn't've"); the table below is generated from the proper forms by that
# rule, which reproduces every entry reachable after lower-casing.
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd
he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've
needn't not've o'clock oughtn't 'ow's'at shan't she'd've shouldn't shouldn't've should've somebody'd've
somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll
that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've
weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll
why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _contraction_table(forms: Iterable[str]) -> dict[str, str]:
    table = {}
    for form in forms:
        quotes = [i for i, ch in enumerate(form) if ch == "'"]
        if len(quotes) == 1:
            table[form.replace("'", "")] = form
        else:
            for i in quotes:
                table[form[:i] + form[i + 1 :]] = form
    return table


_CONTRACTIONS = _contraction_table(_CONTRACTED)


def _strip_punctuation(text: str) -> str:
    # As the official code: a mark next to a space (or any text with a digit,digit comma) is deleted,
    # otherwise it becomes a space ("red-white" -> "red white"); periods go unless a digit follows ("2.5").
    glue = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        if glue or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_DECIMAL.sub("", out)


def normalize_vqa_answer(text: str) -> str:
    """The VQAv2 evaluation's answer normalisation: "Two dogs." -> "2 dogs", "The cat" -> "cat",
    "dont" -> "don't", "yes!" -> "yes"."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    words = []
    for word in _strip_punctuation(text).lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def _as_list(refs: References) -> list[str]:
    if isinstance(refs, str):
        return [refs]
    out = []
    for r in refs:  # VQA annotation dicts ({"answer": ..., "answer_id": ...}) are accepted as they are
        out.append(r["answer"] if isinstance(r, dict) else r)
    if not out:
        raise ValueError("a question needs at least one reference answer")
    return out


def vqa_score(prediction: str, references: References) -> float:
    """VQAv2 accuracy of one prediction: mean over the leave-one-out subsets of min(matches / 3, 1).

    With 10 human answers this is the official formula: a prediction that k of the humans gave scores 0.3, 0.6,
    0.9, 1.0 for k = 1, 2, 3, >=4 (k = 2: eight subsets hold both matches, 2/3; two hold one, 1/3). With a single
    reference it is exact match (leave-one-out would leave nothing to match).
    """
    refs = [normalize_vqa_answer(r) for r in _as_list(references)]
    pred = normalize_vqa_answer(prediction)
    if len(refs) == 1:
        return float(pred == refs[0])
    matches = sum(r == pred for r in refs)
    # Leaving out answer i keeps matches - [ref_i == pred] matching answers among the other n - 1.
    return sum(min(1.0, (matches - (r == pred)) / 3.0) for r in refs) / len(refs)


class _MeanOfScores(Metric):
    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("score", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _score(self, prediction: str, references: References) -> float:
        raise NotImplementedError

    def update(self, predictions: Sequence[str], references: Sequence[References]) -> None:
        if isinstance(predictions, str):
            raise TypeError("predictions must be a list of strings (a batch), not one string")
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        self.score += sum(self._score(p, r) for p, r in zip(predictions, references))
        self.total += len(predictions)

    def compute(self) -> torch.Tensor:
        if self.total == 0:
            return torch.tensor(0.0)
        return (self.score / self.total).float()


class VQAAccuracy(_MeanOfScores):
    """Mean VQAv2 soft accuracy. ``update(predictions, references)``: one reference string or a list of the
    (usually 10) human answers per prediction."""

    def _score(self, prediction: str, references: References) -> float:
        return vqa_score(prediction, references)


class ExactMatch(_MeanOfScores):
    """Fraction of predictions equal to any of their references after ``normalizer`` (default: the module's
    :func:`~lightning_sp.data.answers.normalize_answer`; ``"vqa"`` for :func:`normalize_vqa_answer`)."""

    def __init__(self, normalizer: Union[str, Callable[[str], str]] = "default", **kwargs) -> None:
        super().__init__(**kwargs)
        if normalizer == "default":
            normalizer = normalize_answer
        elif normalizer == "vqa":
            normalizer = normalize_vqa_answer
        elif not callable(normalizer):
            raise ValueError(f"normalizer must be 'default', 'vqa' or a callable, got {normalizer!r}")
        self.normalizer = normalizer

    def _score(self, prediction: str, references: References) -> float:
        pred = self.normalizer(prediction)
        return float(any(pred == self.normalizer(r) for r in _as_list(references)))


# ---- POPE -------------------------------------------------------------------------------------------------


def parse_yes_no(text: str) -> str:
    """LLaVA ``eval_pope.py``: keep the first sentence, drop commas; "no" if it has the word No, no or not,
    else "yes" (so an unparseable answer counts as yes)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _label(label: str | int | bool) -> int:
    if isinstance(label, str):
        key = label.strip().lower()
        if key not in ("yes", "no"):
            raise ValueError(f"POPE labels must be 'yes' or 'no', got {label!r}")
        return int(key == "yes")
    return int(bool(label))


class POPEMetrics(Metric):
    """POPE accuracy, precision, recall, F1 and yes-ratio ("yes" is the positive class).

    ``update(predictions, labels)``: generated answers (parsed with :func:`parse_yes_no`) and labels
    ("yes"/"no", or 1/0). ``compute()`` returns a dict of floats; ratios with an empty denominator are 0.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("tp", "fp", "tn", "fn"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], labels: Sequence[str | int | bool]) -> None:
        if isinstance(predictions, str):
            raise TypeError("predictions must be a list of strings (a batch), not one string")
        if len(predictions) != len(labels):
            raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
        for pred, label in zip(predictions, labels):
            p, y = int(parse_yes_no(pred) == "yes"), _label(label)
            if p and y:
                self.tp += 1
            elif p:
                self.fp += 1
            elif y:
                self.fn += 1
            else:
                self.tn += 1

    def compute(self) -> dict[str, torch.Tensor]:
        tp, fp, tn, fn = (float(x) for x in (self.tp, self.fp, self.tn, self.fn))
        n = tp + fp + tn + fn

        def ratio(a: float, b: float) -> float:
            return a / b if b else 0.0

        precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
        values = {
            "accuracy": ratio(tp + tn, n),
            "precision": precision,
            "recall": recall,
            "f1": ratio(2 * precision * recall, precision + recall),
            "yes_ratio": ratio(tp + fp, n),
        }
        return {k: torch.tensor(v) for k, v in values.items()}
