"""Evaluation metrics against hand-computed values: VQAv2 normalisation and soft accuracy, exact match, POPE."""

import pytest
import torch

from lightning_sp.metrics import ExactMatch, POPEMetrics, VQAAccuracy, normalize_vqa_answer, parse_yes_no, vqa_score


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),
        ("two dogs.", "2 dogs"),
        ("The cat", "cat"),
        ("a red ball!", "red ball"),
        ("An apple", "apple"),
        ("none", "0"),
        ("Yes.", "yes"),
        ("dont", "don't"),
        ("isnt it", "isn't it"),
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("red-white", "red white"),  # a hyphen inside a word becomes a space
        ("red - white", "red white"),  # next to a space it is deleted
        ("2.5", "2.5"),  # a decimal point stays
        ("1,000", "1000"),  # digit,digit commas join
        ("  New\tYork \n", "new york"),
        ("left?", "left"),
    ],
)
def test_vqa_normalisation(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_vqa_soft_accuracy_follows_the_10_answer_formula():
    # k of 10 humans gave the prediction: leave-one-out mean of min(matches / 3, 1).
    def answers(k, other="blue"):
        return ["red"] * k + [other] * (10 - k)

    assert vqa_score("red", answers(0)) == 0.0
    assert vqa_score("red", answers(1)) == pytest.approx(9 * (1 / 3) / 10)  # 0.3
    assert vqa_score("red", answers(2)) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)  # 0.6
    assert vqa_score("red", answers(3)) == pytest.approx((3 * (2 / 3) + 7 * 1) / 10)  # 0.9
    assert vqa_score("red", answers(4)) == 1.0
    assert vqa_score("red", answers(10)) == 1.0
    # Normalisation applies to both sides; VQA annotation dicts are accepted as they are.
    assert vqa_score("Two.", [{"answer": "2", "answer_id": i} for i in range(10)]) == 1.0
    assert vqa_score("the Red", answers(3)) == pytest.approx(0.9)


def test_vqa_accuracy_with_single_references_is_exact_match():
    assert vqa_score("Red.", "red") == 1.0 and vqa_score("blue", ["red"]) == 0.0
    m = VQAAccuracy()
    m.update(["two", "blue", "a cat"], ["2", "red", ["cat"] * 10])
    assert float(m.compute()) == pytest.approx(2 / 3)


def test_vqa_accuracy_accumulates_and_merges_like_a_distributed_sync():
    preds = ["red", "red", "blue", "cat"]
    refs = [["red"] * 2 + ["x"] * 8, ["red"] * 3 + ["x"] * 7, "green", "the cat"]
    full = VQAAccuracy()
    full.update(preds, refs)
    expected = (0.6 + 0.9 + 0.0 + 1.0) / 4
    assert float(full.compute()) == pytest.approx(expected)
    # Two "ranks" holding halves reduce (dist_reduce_fx="sum") to the same value.
    a, b = VQAAccuracy(), VQAAccuracy()
    a.update(preds[:1], refs[:1])
    b.update(preds[1:], refs[1:])
    a.merge_state(b)
    assert float(a.compute()) == pytest.approx(expected)
    assert a._reductions["score"] is not None and a._reductions["total"] is not None


def test_exact_match_default_and_vqa_normalisers():
    m = ExactMatch()
    m.update(["The Red.", "top left", "3"], ["red", ["top right", "top left"], "three"])
    assert float(m.compute()) == pytest.approx(2 / 3)  # the module's normaliser keeps "three" != "3"
    v = ExactMatch(normalizer="vqa")
    v.update(["3"], ["three"])
    assert float(v.compute()) == 1.0
    with pytest.raises(ValueError, match="2 predictions but 1"):
        m.update(["a", "b"], ["a"])


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no", "no"),
        ("Yes, there is a dog.", "yes"),
        ("There is not a dog in the image.", "no"),
        ("No, there is none.", "no"),
        ("Yes. No dog though.", "yes"),  # only the first sentence counts
        ("Nope", "yes"),  # not a word it knows: LLaVA counts it as yes
        ("", "yes"),
    ],
)
def test_pope_answer_parsing_matches_llava(text, parsed):
    assert parse_yes_no(text) == parsed


def test_pope_metrics_from_a_known_confusion_matrix():
    # TP=3, FN=1, FP=2, TN=4 (10 questions).
    preds = ["Yes"] * 3 + ["No"] * 1 + ["Yes, there is."] * 2 + ["No"] * 3 + ["There is not."]
    labels = ["yes"] * 4 + ["no"] * 6
    m = POPEMetrics()
    m.update(preds[:5], labels[:5])
    m.update(preds[5:], labels[5:])
    out = {k: float(v) for k, v in m.compute().items()}
    precision, recall = 3 / 5, 3 / 4
    assert out["accuracy"] == pytest.approx(7 / 10)
    assert out["precision"] == pytest.approx(precision)
    assert out["recall"] == pytest.approx(recall)
    assert out["f1"] == pytest.approx(2 * precision * recall / (precision + recall))  # 2/3
    assert out["yes_ratio"] == pytest.approx(5 / 10)
    assert (int(m.tp), int(m.fn), int(m.fp), int(m.tn)) == (3, 1, 2, 4)


def test_pope_metrics_edge_cases_and_label_forms():
    m = POPEMetrics()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert all(float(v) == 0.0 for v in m.compute().values())  # empty: no division by zero
    m.update(["No", "No"], [0, False])
    out = m.compute()
    assert float(out["accuracy"]) == 1.0 and float(out["precision"]) == 0.0 and float(out["f1"]) == 0.0
    with pytest.raises(ValueError, match="yes' or 'no'"):
        m.update(["yes"], ["maybe"])
    with pytest.raises(TypeError, match="list of strings"):
        m.update("yes", ["yes"])


def test_metric_states_sum_across_ranks():
    for metric in (VQAAccuracy(), ExactMatch(), POPEMetrics()):
        for name, reduce in metric._reductions.items():
            default = metric._defaults[name]
            assert isinstance(default, torch.Tensor) and reduce is not None, (type(metric).__name__, name)
