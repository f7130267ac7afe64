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

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from lightning_sp.module import load_module
from lightning_sp.config import compose
from lightning_sp.data.conversation import IGNORE_INDEX, encode, render_prompt
from lightning_sp.inference import Predictor, PromptBuilder, Question
from lightning_sp.export import export_hf
from test_export import SIZE, trained_run

from conftest import TINY

QUESTIONS = [
    "What is it?",
    "What shape is in the top left cell of this picture?",
    "Describe the image in detail, and name every colour that you can see in it, please.",
]
MAX_NEW_TOKENS = 6
DTYPES = ("float32", "bfloat16")

# Runs in the fresh interpreter: argv[1] = a JSON file {"export": dir, "images": [png], "questions": [...],
# "max_new_tokens": n, "out": json path}.
CLIENT = r"""
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
    (tmp_path / "client.py").write_text(CLIENT)
    args = {
        "export": str(export_dir),
        "images": paths,
        "questions": QUESTIONS,
        "max_new_tokens": MAX_NEW_TOKENS,
        "dtypes": list(dtypes),
        "out": str(tmp_path / "client.json"),
    }
    (tmp_path / "client_args.json").write_text(json.dumps(args))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        TRANSFORMERS_VERBOSITY="error",
    )
    work = tmp_path / "client_cwd"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "client.py"), str(tmp_path / "client_args.json")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp_path / "client.json").read_text())


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
