"""The HF export used the way the llava-hf model cards say, by a process that cannot import lightning_sp.

A fresh interpreter (`python -I`, cwd outside the checkout, an import hook that refuses `lightning_sp`) loads each
export with the Auto classes, builds prompts with `processor.apply_chat_template`, calls
`model.generate(**processor(images=..., text=..., return_tensors="pt"))` one prompt at a time and on a batch of
prompts of different lengths (left-padded by the exported processor), and runs `pipeline("image-text-to-text")`,
in float32 and bfloat16. Its greedy tokens and answers must equal ours: `LlavaSP.generate` / `Predictor` on the same
checkpoint, with the prompts from `conversation.encode_prompt` (the one function that builds our prompt ids)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer

from lightning_sp.constants import IGNORE_INDEX, IMAGE_TOKEN
from lightning_sp.module import load_module
from lightning_sp.config import compose
from lightning_sp.data.conversation import encode, encode_prompt, render_prompt
from lightning_sp.data.tokenizer import load_tokenizer
from lightning_sp.inference import Predictor, PromptBuilder, Question
from lightning_sp.export import export_hf
from test_export import SIZE, trained_run
from test_llama_tokenizer_parity import (
    SPM_SETTINGS,
    VICUNA_RECORDS,
    llava_eval_prompt,
    llava_tokenizer_image_token,
    spm_corpus,
    to_ours,
    vicuna_folder,
)

from conftest import TINY

QUESTIONS = [
    "What is it?",
    "What shape is in the top left cell of this picture?",
    "Describe the image in detail, and name every colour that you can see in it, please.",
]
MAX_NEW_TOKENS = 6
DTYPES = ("float32", "bfloat16")

# The first lines of every client script: `import lightning_sp` (or any of its modules) fails in that process.
REFUSE_LIGHTNING_SP = r"""
import importlib.abc, json, sys

class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "lightning_sp" or name.startswith("lightning_sp."):
            raise ModuleNotFoundError(f"No module named {name!r} (a user of the export does not have it)")
        return None

sys.meta_path.insert(0, _Refuse())
try:
    import lightning_sp  # noqa: F401
    raise SystemExit("lightning_sp is importable in the client process")
except ModuleNotFoundError:
    pass
"""

# Runs in the fresh interpreter: argv[1] = a JSON file {"export": dir, "images": [png], "questions": [...],
# "max_new_tokens": n, "out": json path}.
CLIENT = (
    REFUSE_LIGHTNING_SP
    + r"""
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, pipeline

args = json.load(open(sys.argv[1]))
d, n = args["export"], args["max_new_tokens"]
images = [Image.open(p).convert("RGB") for p in args["images"]]
chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in args["questions"]]
processor = AutoProcessor.from_pretrained(d)
tokenizer = AutoTokenizer.from_pretrained(d)
result = {"prompts": [processor.apply_chat_template(c, add_generation_prompt=True) for c in chats],
          "tokenizer_prompts": [tokenizer.apply_chat_template(
              [{"role": "user", "content": "<image>\n" + q}], add_generation_prompt=True, tokenize=False)
              for q in args["questions"]],
          "padding_side": processor.tokenizer.padding_side}
with_images = [[{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": q}]}]
               for im, q in zip(images, args["questions"])]
chat_ids = processor.apply_chat_template(with_images[0], add_generation_prompt=True, tokenize=True,
                                         return_dict=True, return_tensors="pt")
result["chat_ids"] = chat_ids["input_ids"][0].tolist()
result["chat_keys"] = sorted(chat_ids.keys())
result["call_ids"] = processor(images=images[0], text=result["prompts"][0])["input_ids"][0]
result["call_ids"] = list(result["call_ids"])
for name in args["dtypes"]:
    dtype = getattr(torch, name)
    model = AutoModelForImageTextToText.from_pretrained(d, trust_remote_code=True, dtype=dtype).eval()
    r = result[name] = {"class": type(model).__module__ + "." + type(model).__name__}
    single = []
    for image, prompt in zip(images, result["prompts"]):  # the model card, verbatim
        inputs = processor(images=image, text=prompt, return_tensors="pt").to(dtype)
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
        assert torch.equal(out[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])  # prompt + new tokens
        single.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    r["single"] = single
    batch = processor(images=images, text=result["prompts"], padding=True, return_tensors="pt").to(dtype)
    r["batch_keys"] = sorted(batch.keys())
    r["batch_mask"] = batch["attention_mask"].tolist()
    out = model.generate(**batch, max_new_tokens=n, do_sample=False)
    r["batched"] = out[:, batch["input_ids"].shape[1]:].tolist()
    r["batched_text"] = processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    pipe = pipeline("image-text-to-text", model=d, trust_remote_code=True, dtype=dtype)
    answers = pipe(text=with_images, max_new_tokens=n, return_full_text=False, generate_kwargs={"do_sample": False})
    r["pipeline"] = [a[0]["generated_text"] for a in answers]
    answer = pipe(images=images[0], text=result["prompts"][0], max_new_tokens=n, return_full_text=False,
                  generate_kwargs={"do_sample": False})
    r["pipeline_prompt"] = answer[0]["generated_text"]
if "float32" in args["dtypes"]:
    result["auto_model"] = type(AutoModel.from_pretrained(d, trust_remote_code=True)).__name__
result["imported_lightning_sp"] = sorted(m for m in sys.modules if m.split(".")[0] == "lightning_sp")
json.dump(result, open(args["out"], "w"))
"""
)


def _images():
    """Square images at the model's size: the exported and our preprocessing then agree to rounding (no padding,
    no resize), so the answers can be compared token for token."""
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in QUESTIONS]


def run_client(tmp_path, export_dir, images, dtypes=DTYPES) -> dict:
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"image{i}.png"))
        im.save(paths[-1])
    args = {
        "export": str(export_dir),
        "images": paths,
        "questions": QUESTIONS,
        "max_new_tokens": MAX_NEW_TOKENS,
        "dtypes": list(dtypes),
    }
    return _run_script(tmp_path, "client", CLIENT, args)


def _run_script(tmp_path, name: str, script: str, args: dict) -> dict:
    """Run `script` in a fresh interpreter outside the checkout with argv[1] = `args` as JSON; its JSON result."""
    args = {**args, "out": str(tmp_path / f"{name}.json")}
    (tmp_path / f"{name}.py").write_text(script)
    (tmp_path / f"{name}_args.json").write_text(json.dumps(args))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        TRANSFORMERS_VERBOSITY="error",
    )
    work = tmp_path / f"{name}_cwd"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-I", str(tmp_path / f"{name}.py"), str(tmp_path / f"{name}_args.json")],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,  # transformers asks on stdin whether to trust remote code: answer "no" at once
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(Path(args["out"]).read_text())


def ours(run, images, dtype: str) -> dict:
    """Our greedy generation from the checkpoint: single prompts, the batch, and Predictor's answers.

    In bfloat16 our model is cast as `from_pretrained(dtype=torch.bfloat16)` casts the export: LoRA merged first
    (in float32, as the export writes it: W + BA rounded once to bfloat16 is not W, B and A rounded apart) and RoPE's
    `inv_freq` kept in float32 (transformers builds it in float32; `module.to(bfloat16)` would round it, and on a
    random tiny model, with near-flat logits, either rounding alone can flip a greedy token). Then the logits are
    bitwise HF's. In float32 the model is taken as trained (unmerged)."""
    module = load_module(run)
    if dtype != "float32":
        module.model.llm = module.model.llm.merge_and_unload()
    keep = {name: buf.clone() for name, buf in module.named_buffers() if name.endswith("inv_freq")}
    module = module.to(getattr(torch, dtype)).eval()
    for name, buf in module.named_buffers():
        if name in keep:
            buf.data = keep[name]
    model, tok = module.model, module.tokenizer
    builder = PromptBuilder(tok, module.cfg.stage.template, model.num_visual_tokens, module.cfg.model.vision.image_size)
    questions = [Question(i, q, image=im) for i, (q, im) in enumerate(zip(QUESTIONS, images))]
    kwargs = dict(max_new_tokens=MAX_NEW_TOKENS, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def generate(items):
        batch = builder.collate([builder(q) for q in items])
        with torch.no_grad():
            return model.generate(
                batch["prompt_ids"],
                batch["prompt_attention_mask"],
                batch["pixel_values"].to(getattr(torch, dtype)),
                **kwargs,
            ).tolist()

    single = [generate([q])[0] for q in questions]
    return {
        "single": single,
        "batched": generate(questions),
        "single_answers": [t.strip() for t in tok.batch_decode(single, skip_special_tokens=True)],
        "answers": Predictor(module).predict(
            questions, batch_size=len(questions), max_new_tokens=MAX_NEW_TOKENS, progress=False
        ),
        "prompt_ids": [builder.prompt_ids(q).tolist() for q in questions],
        "prompts": [render_prompt(builder.record(q), builder.template) for q in questions],
    }


def _trained(tmp_path_factory, tokenizer, variant):
    tmp = tmp_path_factory.mktemp(f"client-{variant[0].split('=')[1]}")
    torch.manual_seed(0)  # the tiny model's init: the same model (and answers) on every run
    run = trained_run(tmp, tokenizer, lambda *o: compose([*TINY, *o]), *variant)
    return run, export_hf(run, tmp / "hf")


VARIANTS = {
    "mlp": ("variant=mlp",),
    "pooling": ("variant=pooling",),
    "cropping": ("variant=cropping", "projector.sides=[8,16,24]", "projector.dfi_kv_tokens=9"),
}


@pytest.fixture(scope="module", params=["mlp", "pooling"])
def client(request, tmp_path_factory, tokenizer):
    """(kind, run dir, export dir, what the client saw, our generations per dtype)."""
    run, out = _trained(tmp_path_factory, tokenizer, VARIANTS[request.param])
    images = _images()
    seen = run_client(tmp_path_factory.mktemp("client"), out, images)
    return request.param, run, out, seen, {d: ours(run, images, d) for d in DTYPES}


def _trim(ids, pad):
    """New tokens up to (not including) trailing padding."""
    while ids and ids[-1] == pad:
        ids = ids[:-1]
    return ids


def test_client_loads_the_export_without_lightning_sp(client):
    kind, _, _, seen, _ = client
    assert seen["imported_lightning_sp"] == []
    for dtype in DTYPES:
        if kind == "mlp":
            assert seen[dtype]["class"] == "transformers.models.llava.modeling_llava.LlavaForConditionalGeneration"
        else:  # the remote code copied into the export, through AutoModelForImageTextToText
            assert seen[dtype]["class"].startswith("transformers_modules.")
            assert seen[dtype]["class"].endswith(".modeling_llava_sp.LlavaSPForConditionalGeneration")
    assert seen["auto_model"] == ("LlavaModel" if kind == "mlp" else "LlavaSPForConditionalGeneration")


def test_chat_template_renders_our_prompt_token_for_token(client, tokenizer):
    _, _, _, seen, mine = client
    ref = mine["float32"]
    assert seen["prompts"] == ref["prompts"]  # processor.apply_chat_template(..., add_generation_prompt=True)
    assert seen["tokenizer_prompts"] == ref["prompts"]  # the tokenizer carries the same template
    assert seen["call_ids"] == ref["prompt_ids"][0]  # processor(images=..., text=prompt) == encode_prompt, expanded
    assert seen["chat_ids"] == ref["prompt_ids"][0]  # apply_chat_template(tokenize=True): the same ids
    assert "token_type_ids" not in seen["chat_keys"]
    assert seen["padding_side"] == "left"


@pytest.mark.parametrize("dtype", DTYPES)
def test_generate_with_processor_inputs_equals_ours(client, tokenizer, dtype):
    _, _, _, seen, mine = client
    got, ref = seen[dtype], mine[dtype]
    assert got["batch_keys"] == ["attention_mask", "input_ids", "pixel_values"]  # no token_type_ids
    lengths = [sum(row) for row in got["batch_mask"]]
    assert len(set(lengths)) == len(QUESTIONS)  # prompts of different lengths...
    assert all(row[-1] == 1 for row in got["batch_mask"])  # ...padded on the left
    pad = tokenizer.pad_token_id
    assert [_trim(t, pad) for t in got["single"]] == [_trim(t, pad) for t in ref["single"]]
    assert got["batched"] == ref["batched"]
    assert [t.strip() for t in got["batched_text"]] == ref["answers"]
    assert any(ref["single"])  # something was generated


@pytest.mark.parametrize("dtype", DTYPES)
def test_pipeline_answers_equal_ours(client, dtype):
    """The pipeline runs one chat at a time: our single-prompt answers (in float32 also Predictor's batched ones;
    in bfloat16 left padding itself changes the rounding, so batched answers may differ from single ones)."""
    _, _, _, seen, mine = client
    assert [a.strip() for a in seen[dtype]["pipeline"]] == mine[dtype]["single_answers"]
    assert seen[dtype]["pipeline_prompt"].strip() == mine[dtype]["single_answers"][0]
    if dtype == "float32":
        assert mine[dtype]["single_answers"] == mine[dtype]["answers"]


@pytest.mark.slow
def test_cropping_export_in_a_client(tmp_path_factory, tokenizer):
    run, out = _trained(tmp_path_factory, tokenizer, VARIANTS["cropping"])
    images = _images()
    seen = run_client(tmp_path_factory.mktemp("client"), out, images, dtypes=("float32",))
    ref = ours(run, images, "float32")
    assert seen["chat_ids"] == ref["prompt_ids"][0]
    assert seen["float32"]["batched"] == ref["batched"]
    assert [a.strip() for a in seen["float32"]["pipeline"]] == ref["single_answers"] == ref["answers"]


def test_multi_turn_chat_template_and_assistant_mask(tmp_path, tokenizer, tiny_cfg):
    """Several rounds and a system message render as our template renders them; the assistant mask that
    `return_assistant_tokens_mask` gives is our training label mask (the tokenizer adds no BOS there)."""
    run = trained_run(tmp_path, tokenizer, tiny_cfg, "variant=mlp")
    processor = AutoProcessor.from_pretrained(export_hf(run, tmp_path / "hf"))
    turns = [
        ("human", "What is in the picture?"),
        ("gpt", "A red circle."),
        ("human", "Where is it?"),
        ("gpt", "2 cells from the top left."),
    ]
    record = {"id": 0, "image": "x", "conversations": [{"from": f, "value": v} for f, v in turns]}
    messages = [
        {"role": "user" if f == "human" else "assistant", "content": [{"type": "text", "text": v}]} for f, v in turns
    ]
    messages[0]["content"].insert(0, {"type": "image"})
    prompt_record = {**record, "conversations": record["conversations"][:3]}
    assert processor.apply_chat_template(messages[:3], add_generation_prompt=True) == render_prompt(
        prompt_record, "vicuna_v1"
    )
    # String content with the placeholder anywhere is normalised as our records are.
    assert processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is <image> this? "}], add_generation_prompt=True, tokenize=False
    ) == render_prompt(
        {"id": 0, "image": "x", "conversations": [{"from": "human", "value": "What is <image> this? "}]}, "vicuna_v1"
    )
    system = processor.apply_chat_template(
        [{"role": "system", "content": "Be brief."}] + messages[:1], add_generation_prompt=True
    )
    assert system == "Be brief. USER: <image>\nWhat is in the picture? ASSISTANT:"

    enc = encode(record, tokenizer, "vicuna_v1")
    out = processor.tokenizer.apply_chat_template(
        [{**m, "content": ("<image>\n" if i == 0 else "") + m["content"][-1]["text"]} for i, m in enumerate(messages)],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert out["input_ids"] == enc.input_ids[1:]  # our ids less BOS
    assert out["assistant_masks"] == [int(label != IGNORE_INDEX) for label in enc.labels[1:]]


# Runs in the fresh interpreter: argv[1] = a JSON file {"export": dir, "image": png, "prompts": [typed prompts],
# "chats": [messages, an {"type": "image"} item where the image goes], "out": json path}. The processor's ids for
# typed prompts and chats (one at a time and batched), AutoProcessor without trust_remote_code, and greedy answers
# from generate on the chat ids and from the pipeline.
PROCESSOR_CLIENT = (
    REFUSE_LIGHTNING_SP
    + r"""
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, pipeline

args = json.load(open(sys.argv[1]))
d, prompts, chats = args["export"], args["prompts"], args["chats"]
image = Image.open(args["image"]).convert("RGB")
result = {}
try:  # as a model card says it, without trust_remote_code
    result["without_trust"] = type(AutoProcessor.from_pretrained(d)).__name__
except ValueError as e:
    result["without_trust"] = f"ValueError: {e}"
processor = AutoProcessor.from_pretrained(d, trust_remote_code=True)
result["class"] = type(processor).__module__ + "." + type(processor).__name__
result["typed_single"] = [list(processor(images=image, text=p)["input_ids"][0]) for p in prompts]
batch = processor(images=[image] * len(prompts), text=prompts, padding=True, return_tensors="pt")
result["typed_batch"], result["typed_mask"] = batch["input_ids"].tolist(), batch["attention_mask"].tolist()


def with_image(chat):
    return [{**m, "content": [{**c, "image": image} if c["type"] == "image" else c for c in m["content"]]}
            for m in chat]


result["chat_text"] = [processor.apply_chat_template(c, add_generation_prompt=True) for c in chats]
result["chat_single"] = [
    processor.apply_chat_template(with_image(c), add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"][0] for c in chats]
batch = processor.apply_chat_template([with_image(c) for c in chats], add_generation_prompt=True, tokenize=True,
                                      return_dict=True, padding=True, return_tensors="pt")
result["chat_batch"], result["chat_mask"] = batch["input_ids"].tolist(), batch["attention_mask"].tolist()
model = LlavaForConditionalGeneration.from_pretrained(d).eval()
result["model"] = type(model).__name__
direct = []
for c in chats:
    inputs = processor.apply_chat_template(with_image(c), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    direct.append(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
result["generated"] = direct
pipe = pipeline("image-text-to-text", model=d, trust_remote_code=True)
result["pipeline_processor"] = type(pipe.processor).__name__
answers = pipe(text=[with_image(c) for c in chats], max_new_tokens=4, return_full_text=False,
               generate_kwargs={"do_sample": False})
result["pipeline"] = [a[0]["generated_text"] for a in answers]
result["imported_lightning_sp"] = sorted(m for m in sys.modules if m.split(".")[0] == "lightning_sp")
json.dump(result, open(args["out"], "w"))
"""
)

# Prompt records of the SentencePiece parity tests (the last answer is dropped: the prompt asks for it).
SP_RECORDS = ("numeric_single_turn", "image_multi_turn", "image_after_question_multi")
# Typed by hand as the llava-hf model cards type them (no system prompt), and a digit right after the placeholder.
# (Not a space: there a non-legacy fast Llama tokenizer, ours and the export's, gives " 2" as "▁2" where
# SentencePiece itself, LLaVA's slow tokenizer, gives "▁▁2" -- a fast/slow conversion difference, not the processor's.)
TYPED = ("USER: <image>\nWhat is shown here? ASSISTANT:", "USER: <image>2 dogs or 3? ASSISTANT:")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """The parity tests' small Llama-like SentencePiece model (vocabulary with "USER" but not "▁USER")."""
    out = tmp_path_factory.mktemp("spm")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(spm_corpus("vicuna_like")), model_prefix=str(out / "vicuna_like"), **SPM_SETTINGS
    )
    return out / "vicuna_like.model"


def _messages(record):
    """HF chat messages of a record's prompt turns: an image item first in the turn that has the placeholder."""
    turns = record["conversations"][:-1]
    messages = []
    for turn in turns:
        text = turn["value"]
        content = [{"type": "text", "text": text.replace("<image>", "").strip()}]
        if "<image>" in text:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user" if turn["from"] == "human" else "assistant", "content": content})
    return messages


def _left_padded(rows, pad):
    width = max(len(r) for r in rows)
    return [[pad] * (width - len(r)) + r for r in rows], [[0] * (width - len(r)) + [1] * len(r) for r in rows]


@pytest.fixture(scope="module", params=[False, True], ids=["nonlegacy", "legacy"])
def sp_client(request, spm_model, tmp_path_factory):
    """A Vicuna-like SentencePiece folder (`legacy` false as Vicuna v1.5's, or true), an mlp run on it, its export,
    and what a process without lightning_sp gets from the exported processor."""
    legacy = request.param
    folder = vicuna_folder(tmp_path_factory.mktemp("tok"), spm_model, legacy, "LlamaTokenizer")
    tok = load_tokenizer(folder)
    assert tok.legacy is legacy
    tmp = tmp_path_factory.mktemp(f"sp-legacy-{legacy}")
    torch.manual_seed(0)
    run = trained_run(tmp, tok, lambda *o: compose([*TINY, *o]), "variant=mlp", f"model.tokenizer={folder}")
    out = export_hf(run, tmp / "hf")
    image = tmp / "image.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(image)
    records = [VICUNA_RECORDS[name] for name in SP_RECORDS]
    args = {
        "export": str(out),
        "image": str(image),
        "prompts": [render_prompt(r, "vicuna_v1") for r in records] + list(TYPED),
        "chats": [_messages(r) for r in records],
    }
    seen = _run_script(tmp_path_factory.mktemp("sp-client"), "processor_client", PROCESSOR_CLIENT, args)
    # LLaVA's side, independently: its tokenizer_image_token on the slow SentencePiece tokenizer, as train.py loads it.
    llava = AutoTokenizer.from_pretrained(str(folder), use_fast=False)
    return legacy, tok, llava, records, args, seen, out


def test_exported_processor_gives_llava_prompt_ids(sp_client):
    """Typed prompts and apply_chat_template, one at a time and batched (left padding), give exactly the ids LLaVA
    tokenizes the prompt to (= encode_prompt's) with the placeholder expanded, for both legacy settings."""
    legacy, tok, llava, records, args, seen, _ = sp_client
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    n = (SIZE // 14) ** 2  # the mlp model's visual tokens: the patch grid, CLS dropped

    def expanded(ids):
        return [t for i in ids for t in ([i] * n if i == image_id else [i])]

    prompts = [encode_prompt(r, tok, "vicuna_v1") for r in records]
    for record, ids, text in zip(records, prompts, args["prompts"]):
        assert ids == to_ours(llava_eval_prompt(record, llava), image_id)  # the encoder is LLaVA's
        assert ids == to_ours(llava_tokenizer_image_token(text, llava), image_id)
    typed = [to_ours(llava_tokenizer_image_token(p, llava), image_id) for p in TYPED]
    want = [expanded(ids) for ids in prompts + typed]
    assert seen["typed_single"] == want
    assert (seen["typed_batch"], seen["typed_mask"]) == _left_padded(want, tok.pad_token_id)
    assert seen["chat_text"] == args["prompts"][: len(records)]
    assert seen["chat_single"] == want[: len(records)]
    assert (seen["chat_batch"], seen["chat_mask"]) == _left_padded(want[: len(records)], tok.pad_token_id)
    assert seen["model"] == "LlavaForConditionalGeneration" and seen["imported_lightning_sp"] == []
    # pipeline(..., trust_remote_code=True) builds the same processor, so its answers are generate's on these ids.
    assert seen["pipeline_processor"] == seen["class"].rsplit(".", 1)[1]
    assert seen["pipeline"] == seen["generated"]


def test_exported_processor_is_remote_code_only_where_needed(sp_client):
    """legacy: plain LlavaProcessor (one pass is exact), nothing to trust. Non-legacy: the remote LlavaSPProcessor,
    and AutoProcessor without trust_remote_code refuses to load rather than give one-pass ids."""
    legacy, _, _, _, _, seen, out = sp_client
    config = json.loads((out / "processor_config.json").read_text())
    if legacy:
        assert seen["class"] == "transformers.models.llava.processing_llava.LlavaProcessor"
        assert seen["without_trust"] == "LlavaProcessor"
        assert "auto_map" not in config and not (out / "processing_llava_sp.py").exists()
    else:
        assert seen["class"].startswith("transformers_modules.")
        assert seen["class"].endswith(".processing_llava_sp.LlavaSPProcessor")
        assert seen["without_trust"].startswith("ValueError") and "trust_remote_code=True" in seen["without_trust"]
        assert config["auto_map"] == {"AutoProcessor": "processing_llava_sp.LlavaSPProcessor"}
    assert "auto_map" not in json.loads((out / "config.json").read_text())  # the model stays plain transformers
