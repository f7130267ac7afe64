"""lmms-eval adapter on a tiny trained run, driven by hand-made requests (lmms-eval itself is not installed)."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from evalkit import trained_run, write_benchmark_files
from PIL import Image

from lightning_sp.inference import Predictor, Question
from lightning_sp.question_files import load_question_file
from lightning_sp.lmms_adapter import HAVE_LMMS_EVAL, LightningSP

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    run_dir = trained_run(tmp_path_factory)
    lm = LightningSP(
        pretrained=str(run_dir / "checkpoints" / "last.ckpt"), device="cpu", batch_size=3, max_new_tokens=6
    )
    files = write_benchmark_files(tmp_path_factory.mktemp("lmms"))
    questions = load_question_file(files["pope"], image_root=files["image_root"])
    docs = {i: {"image": Image.open(q.image).convert("RGB"), "question": q.text} for i, q in enumerate(questions)}
    lm.task_dict = {"pope": {"test": docs}}
    return lm, questions


def _visual(doc):
    return [doc["image"]]


def _gen_requests(lm, gen_kwargs):
    docs = lm.task_dict["pope"]["test"]
    return [
        SimpleNamespace(args=(docs[i]["question"], dict(gen_kwargs), _visual, i, "pope", "test"))
        for i in range(len(docs))
    ]


def test_imports_without_lmms_eval():
    assert HAVE_LMMS_EVAL == (importlib.util.find_spec("lmms_eval") is not None)
    for name in ("generate_until", "loglikelihood", "loglikelihood_rolling", "generate_until_multi_round"):
        assert callable(getattr(LightningSP, name))


def test_generate_until_matches_the_evaluator_and_keeps_request_order(adapter):
    lm, questions = adapter
    out = lm.generate_until(_gen_requests(lm, {"max_new_tokens": 6, "temperature": 0, "until": ["\n\n"]}))
    assert len(out) == len(questions) and all(isinstance(o, str) for o in out)
    # Same questions through the evaluator (file images, one at a time): same answers.
    direct = lm.predictor.predict(questions, batch_size=1, max_new_tokens=6, progress=False)
    assert out == direct
    # Mixed generation settings are grouped, then put back in request order.
    reqs = _gen_requests(lm, {"max_new_tokens": 6})
    reqs[1].args[1]["max_new_tokens"] = 2
    mixed = lm.generate_until(reqs)
    assert mixed[0] == out[0] and mixed[2:] == out[2:]
    short = lm.predictor.predict(questions[1:2], max_new_tokens=2, progress=False)
    assert mixed[1] == short[0]


def test_generate_until_cuts_at_stop_strings(adapter):
    lm, _ = adapter
    full = lm.generate_until(_gen_requests(lm, {"max_new_tokens": 6}))
    cut_at = next((a[len(a) // 2] for a in full if len(a) > 1), None)
    if cut_at is None:
        pytest.skip("the tiny model answered with single characters")
    cut = lm.generate_until(_gen_requests(lm, {"max_new_tokens": 6, "until": [cut_at]}))
    assert cut == [a.split(cut_at)[0].strip() for a in full]
    # decoding itself stops at the stop string (it does not run to max_new_tokens and cut the text afterwards)
    predictor: Predictor = lm.predictor
    q = next(q for q, a in zip(_questions(lm), full) if cut_at in a)
    batch = predictor.builder.collate([predictor.builder(q)])
    args = (batch["prompt_ids"], batch["prompt_attention_mask"], batch["pixel_values"])
    whole = predictor.model.generate(*args, max_new_tokens=6)
    stopped = predictor.model.generate(*args, max_new_tokens=6, stop_strings=[cut_at], tokenizer=predictor.tokenizer)
    assert stopped.shape[1] < whole.shape[1] and torch.equal(stopped[0], whole[0, : stopped.shape[1]])
    assert cut_at in predictor.tokenizer.decode(stopped[0]) and cut_at not in predictor.tokenizer.decode(
        stopped[0, :-1]
    )


def _questions(lm) -> list[Question]:
    docs = lm.task_dict["pope"]["test"]
    return [Question(question_id=i, text=docs[i]["question"], image=docs[i]["image"]) for i in range(len(docs))]


def _manual_logprob(predictor, q, cont_ids):
    prompt = predictor.builder.prompt_ids(q)
    ids = torch.cat([prompt, torch.tensor(cont_ids)])[None]
    with torch.no_grad():
        logits = (
            predictor.model(
                input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=predictor.builder.pixel_values(q)[None]
            )
            .logits[0]
            .float()
        )
    logp = torch.log_softmax(logits[prompt.numel() - 1 : -1], -1)
    return float(sum(logp[i, t] for i, t in enumerate(cont_ids))), logits[prompt.numel() - 1 : -1].argmax(-1).tolist()


def test_loglikelihood_is_the_continuation_logprob(adapter):
    lm, questions = adapter
    predictor: Predictor = lm.predictor
    docs = lm.task_dict["pope"]["test"]
    q = Question(question_id=0, text=questions[0].text, image=docs[0]["image"])
    reqs = [
        SimpleNamespace(args=(docs[0]["question"], " yes", _visual, 0, "pope", "test")),
        SimpleNamespace(args=(docs[0]["question"], lambda doc: "red square", _visual, 0, "pope", "test")),
    ]
    results = lm.loglikelihood(reqs)
    # "red square" follows "ASSISTANT:" after a space, as answers do in the template.
    for (logprob, greedy), text in zip(results, (" yes", " red square")):
        ids = predictor.tokenizer(text, add_special_tokens=False)["input_ids"]
        expected, argmax = _manual_logprob(predictor, q, ids)
        assert logprob == pytest.approx(expected, abs=1e-4) and logprob < 0
        assert greedy == (argmax == ids)


def test_greedy_continuation_is_flagged_greedy(adapter):
    lm, questions = adapter
    predictor: Predictor = lm.predictor
    q = Question(question_id=0, text=questions[0].text, image=lm.task_dict["pope"]["test"][0]["image"])
    batch = predictor.builder.collate([predictor.builder(q)])
    greedy_ids = predictor.model.generate(
        batch["prompt_ids"], batch["prompt_attention_mask"], batch["pixel_values"], max_new_tokens=3
    )[0]
    logprob, greedy = predictor.continuation_logprob(q, greedy_ids)
    assert greedy is True and logprob == pytest.approx(_manual_logprob(predictor, q, greedy_ids.tolist())[0], abs=1e-4)
    other = greedy_ids.clone()
    other[-1] = (other[-1] + 1) % predictor.tokenizer.vocab_size
    assert predictor.continuation_logprob(q, other)[1] is False


def test_unsupported_request_types_say_so(adapter):
    lm, _ = adapter
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([])
