"""Validation's teacher-forced exact match equals greedy decoding + exact token match, question by question.

A tiny model is scored twice on the same val batches (built by the datamodule's own SampleBuilder and
collate_eval): by `teacher_forced_hits` on the forward that gives val loss, and by the real greedy `generate` path
(`LlavaSPModule.generate_tokens`) compared token for token with the reference answer and EOS. Random, then
briefly trained on some of the questions, so that answers come out right, wrong, cut short by an early EOS, and
continued past the reference without EOS.
"""

import io
import json
import random

import lightning as L
import pytest
import torch
from conftest import TINY

from lightning_sp.constants import IGNORE_INDEX, IMAGE_TOKEN
from lightning_sp.config import compose
from lightning_sp.data import synthetic
from lightning_sp.data.answers import normalize_answer
from lightning_sp.data.collate import collate_eval
from lightning_sp.data.samples import SampleBuilder
from lightning_sp.module import LlavaSPModule, teacher_forced_hits

IMAGE_SIZE = 126  # a 9x9 patch grid, the smallest the pooling projector takes: short sequences, a fast test
TWO_WORD = ("top left", "top right", "bottom left", "bottom right")


def _scenes_and_questions():
    """Single-turn questions (every type; the locate answers of two tokens among them) and two-turn records."""
    rng = random.Random(0)
    single, multi, images = [], [], {}
    for i in range(12):
        scene = synthetic.sample_scene(rng)
        qtype = "locate" if i % 3 == 0 else synthetic.QTYPES[i % 5]
        q, a = synthetic.ask(scene, qtype, rng)
        for _ in range(50):  # a two-word locate answer for the prefix cases below
            if qtype != "locate" or a in TWO_WORD:
                break
            q, a = synthetic.ask(scene, qtype, rng)
        single.append(synthetic.make_record("val", i, scene, [(qtype, q, a)]))
        images[single[-1]["id"]] = _png(scene)
    for i in range(12, 15):
        scene = synthetic.sample_scene(rng)
        qas = [("count", *synthetic.ask(scene, "count", rng)), ("shape_at", *synthetic.ask(scene, "shape_at", rng))]
        multi.append({**synthetic.make_record("val", i, scene, qas), "qtype": "shape_at"})  # the scored, last one
        images[multi[-1]["id"]] = _png(scene)
    return single, multi, images


def _png(scene) -> bytes:
    buf = io.BytesIO()
    synthetic.render(scene, IMAGE_SIZE).save(buf, format="PNG")
    return buf.getvalue()


def _answer(rec: dict, value: str, turn: int = -1) -> dict:
    """``rec`` with another reference answer in turn ``turn`` (same image, same questions)."""
    out = json.loads(json.dumps(rec))
    gpt_turns = [t for t in out["conversations"] if t["from"] == "gpt"]
    gpt_turns[turn]["value"] = value
    out["id"] = f"{rec['id']}:{value}:{turn}"
    return out


def _random_module(tokenizer) -> LlavaSPModule:
    torch.manual_seed(0)
    return LlavaSPModule(compose([*TINY, f"model.vision.image_size={IMAGE_SIZE}"]), tokenizer).eval()


@pytest.fixture(scope="module")
def questions(one_thread, tokenizer):
    """(single-turn records, two-turn records, records -> val batch as the datamodule makes it)."""
    single, multi, images = _scenes_and_questions()
    num_visual_tokens = _random_module(tokenizer).model.num_visual_tokens
    builder = SampleBuilder(tokenizer, "vicuna_v1", num_visual_tokens, IMAGE_SIZE, None, for_eval=True)

    def batch_of(records):
        samples = list(
            builder(
                {"__key__": r["id"], "json": json.dumps(r).encode(), "png": images[r["id"].split(":")[0]]}
                for r in records
            )
        )
        assert len(samples) == len(records)
        return collate_eval(
            samples,
            tokenizer.pad_token_id,
            num_visual_tokens=num_visual_tokens,
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        )

    return single, multi, batch_of


@pytest.fixture(scope="module")
def trained(questions, tokenizer):
    """The tiny model after memorising 8 single-turn and 2 two-turn records: those come out right, others not."""
    single, multi, batch_of = questions
    module = _random_module(tokenizer)
    _train(module, batch_of(single[:8] + multi[:2]))
    return module


def _train(module, batch, steps: int = 60) -> None:
    """Memorise ``batch`` (every LLM weight and the projector, Adam)."""
    for p in module.model.llm.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam([p for p in module.model.parameters() if p.requires_grad], lr=3e-3)
    module.train()
    for _ in range(steps):
        loss = module.model(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels", "logit_positions")}
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()


def _score_both_ways(module, tokenizer, batch) -> list[dict]:
    """Per question: the teacher-forced hit, the greedy tokens and what greedy decoding did with the answer."""
    with torch.no_grad():
        out = module.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            labels=batch["labels"],
            logit_positions=batch["logit_positions"],
        )
        forced = teacher_forced_hits(out.logits, batch["labels"], batch["logit_positions"]).tolist()
        targets = batch["labels"][:, 1:].index_select(1, batch["logit_positions"])
        every_answer = ((out.logits.argmax(-1) == targets) | (targets == IGNORE_INDEX)).all(1).tolist()
        greedy = module.generate_tokens(batch).tolist()
    texts = tokenizer.batch_decode(torch.tensor(greedy), skip_special_tokens=True)
    eos = tokenizer.eos_token_id
    rows = []
    for hit, every, tokens, text, reference in zip(forced, every_answer, greedy, texts, batch["answers"]):
        # The reference as the model must emit it: the answer's tokens after "ASSISTANT:", then end of turn.
        answer = tokenizer(" " + reference, add_special_tokens=False).input_ids
        assert len(answer) + 1 <= module.cfg.eval.max_new_tokens  # greedy decoding has room to match
        k = len(answer)
        if tokens[: k + 1] == answer + [eos]:
            outcome = "exact"
        elif tokens[:k] == answer:
            outcome = "continues"  # the answer, then anything but EOS
        elif eos in tokens[:k]:
            outcome = "early_eos"
        else:
            outcome = "wrong_token"
        rows.append(
            {
                "forced": hit,
                "greedy": outcome == "exact",
                "outcome": outcome,
                "every_answer": every,
                "text": text,
                "reference": reference,
            }
        )
    return rows


def test_teacher_forced_hit_equals_greedy_exact_match(questions, trained, tokenizer):
    single, multi, batch_of = questions
    # Questions with other reference answers than the trained ones: a strict prefix (greedy goes on past it),
    # an extension (greedy stops before it ends), a wrong single word; and in a two-turn record, a changed
    # first answer (only the last one, which greedy decoding answers, is scored).
    variants = [
        _answer(r, r["conversations"][1]["value"].split()[0])
        for r in single
        if r["conversations"][1]["value"] in TWO_WORD
    ]
    variants += [_answer(r, r["conversations"][1]["value"] + " center") for r in single[:4]]
    variants += [_answer(r, "purple") for r in single[4:6]] + [_answer(multi[0], "7", turn=0)]
    scored = [single[:8] + multi[:2], single[8:] + multi[2:] + variants[:3], variants[3:]]  # mixed lengths

    random = _random_module(tokenizer)
    random_rows = [row for records in scored for row in _score_both_ways(random, tokenizer, batch_of(records))]
    assert [r["forced"] for r in random_rows] == [r["greedy"] for r in random_rows]

    rows = [row for records in scored for row in _score_both_ways(trained, tokenizer, batch_of(records))]
    assert [r["forced"] for r in rows] == [r["greedy"] for r in rows], rows
    outcomes = [r["outcome"] for r in rows]
    # Every way of being right or wrong occurs, so the equality above was tested on each.
    assert {"exact", "continues", "early_eos", "wrong_token"} <= set(outcomes), outcomes
    assert sum(r["forced"] for r in rows) >= 8 and sum(not r["forced"] for r in rows) >= 8
    # A changed earlier answer (its argmax is the trained one) does not count against the last one.
    assert rows[-1]["forced"] and not rows[-1]["every_answer"], rows[-1]
    # The string metric validation used before agrees wherever the tokens match (it may forgive more: case,
    # punctuation, articles).
    assert all(normalize_answer(r["text"]) == normalize_answer(r["reference"]) for r in rows if r["forced"])


def test_validation_logs_teacher_forced_accuracy_and_keeps_every_question(questions, trained):
    single, multi, batch_of = questions
    module = trained
    batches = [batch_of(single[:7]), batch_of(single[7:] + multi)]
    expected = []
    for batch in batches:
        with torch.no_grad():
            out = module.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
                labels=batch["labels"],
                logit_positions=batch["logit_positions"],
            )
        hits = teacher_forced_hits(out.logits, batch["labels"], batch["logit_positions"]).tolist()
        expected += [{"id": i, "qtype": t, "hit": int(h)} for i, t, h in zip(batch["ids"], batch["qtypes"], hits)]
    assert 0 < sum(q["hit"] for q in expected) < len(expected)  # right and wrong answers both counted
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None)  # the batches as they are
    logged = trainer.validate(module, dataloaders=loader, verbose=False)[0]
    assert module.val_questions == expected
    assert logged["val/accuracy"] == pytest.approx(sum(q["hit"] for q in expected) / len(expected))
    for qtype in {q["qtype"] for q in expected}:  # every type here is named
        of_type = [q["hit"] for q in expected if q["qtype"] == qtype]
        assert logged[f"val/accuracy_{qtype}"] == pytest.approx(sum(of_type) / len(of_type)), qtype
