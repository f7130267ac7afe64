"""The VLM: visual-token splicing, loss, stage trainable sets, batched generation."""

import pytest
import torch

from lightning_sp.models.vlm import LlavaSP
from lightning_sp.trainable import parameter_counts, set_trainable


def build(tiny_cfg, tokenizer, *overrides):
    cfg = tiny_cfg(*overrides)
    model = LlavaSP.from_config(cfg, tokenizer)
    set_trainable(model, cfg.stage)
    return model.eval()


def ids_with_image(tokenizer, text_before, text_after, n):
    img = tokenizer.convert_tokens_to_ids("<image>")
    before = tokenizer(text_before, add_special_tokens=False)["input_ids"]
    after = tokenizer(text_after, add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id, *before, *([img] * n), *after]


@pytest.mark.parametrize("variant", ["pooling", "mlp"])
def test_splice_places_visual_tokens_in_order_and_leaves_text(tiny_cfg, tokenizer, variant):
    torch.manual_seed(0)
    model = build(tiny_cfg, tokenizer, f"variant={variant}")
    n = model.num_visual_tokens
    assert n == (582 if variant == "pooling" else 576)
    a = ids_with_image(tokenizer, "A chat USER:", " where is the red square? ASSISTANT:", n)
    b = tokenizer("USER: no image here, only text ASSISTANT:")["input_ids"]
    length = max(len(a), len(b))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([a + [pad] * (length - len(a)), b + [pad] * (length - len(b))])
    pixels = torch.randn(2, 3, 336, 336)
    with torch.no_grad():
        emb = model.embed(input_ids, pixels)
        visual = model.visual_tokens(pixels)
        table = model.llm.get_input_embeddings().weight
    start = a.index(model.image_token_id)
    torch.testing.assert_close(emb[0, start : start + n], visual[0])
    text_pos = [i for i, t in enumerate(a) if t != model.image_token_id]
    torch.testing.assert_close(emb[0, text_pos], table[torch.tensor(a)[text_pos]])
    torch.testing.assert_close(emb[1], table[input_ids[1]])  # text-only sample: embeddings untouched


def test_loss_ignores_visual_and_padding_positions(tiny_cfg, tokenizer):
    torch.manual_seed(0)
    model = build(tiny_cfg, tokenizer)
    n = model.num_visual_tokens
    ids = torch.tensor([ids_with_image(tokenizer, "USER:", " colour? ASSISTANT: red", n)])
    labels = ids.clone()
    labels[ids == model.image_token_id] = -100
    labels[:, :-2] = -100  # supervise only the last two tokens
    pixels = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        out = model(ids, torch.ones_like(ids), pixels, labels=labels)
        logits = model.llm(inputs_embeds=model.embed(ids, pixels)).logits
    expected = torch.nn.functional.cross_entropy(logits[0, -3:-1], ids[0, -2:])
    torch.testing.assert_close(out.loss, expected)


def test_loss_from_supervised_positions_only_equals_the_lms_own_loss_and_gradients(tiny_cfg, tokenizer):
    """LlavaSP computes logits only where a label follows (not over the 582 visual positions); the loss and every
    trainable gradient must be the LM's own full-logits `labels=` loss, on a right-padded batch whose rows are
    supervised at different positions, with the positions given (collate) or computed (no host helper)."""
    from lightning_sp.constants import supervised_logit_positions

    torch.manual_seed(0)
    model = build(tiny_cfg, tokenizer).train()
    n = model.num_visual_tokens
    pad = tokenizer.pad_token_id
    rows = [
        ids_with_image(tokenizer, "USER:", " colour? ASSISTANT: red USER: shape? ASSISTANT: circle", n),
        ids_with_image(tokenizer, "USER:", " where? ASSISTANT: top left", n),
    ]
    length = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
    mask = (torch.arange(length) < torch.tensor([len(r) for r in rows])[:, None]).long()
    labels = torch.full_like(ids, -100)
    labels[0, len(rows[0]) - 9 : len(rows[0]) - 6] = ids[0, len(rows[0]) - 9 : len(rows[0]) - 6]
    labels[0, len(rows[0]) - 1] = ids[0, len(rows[0]) - 1]
    labels[1, len(rows[1]) - 2 : len(rows[1])] = ids[1, len(rows[1]) - 2 : len(rows[1])]
    pixels = torch.randn(2, 3, 336, 336)
    positions = supervised_logit_positions(labels)
    assert positions.tolist() == sorted(
        {p - 1 for r in range(2) for p in (labels[r] != -100).nonzero().flatten().tolist()}
    )

    def loss_and_grads(loss_fn):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    reference = loss_and_grads(
        lambda: model.llm(inputs_embeds=model.embed(ids, pixels), attention_mask=mask, labels=labels).loss
    )
    for given in (positions, None):
        out = model(ids, mask, pixels, labels=labels, logit_positions=given)
        assert out.logits.shape[:2] == (2, len(positions))
        loss, grads = loss_and_grads(lambda: model(ids, mask, pixels, labels=labels, logit_positions=given).loss)
        torch.testing.assert_close(loss, reference[0], rtol=1e-6, atol=1e-6)
        assert grads.keys() == reference[1].keys() and len(grads) > 10
        for k in grads:
            torch.testing.assert_close(grads[k], reference[1][k], rtol=1e-5, atol=1e-7, msg=k)


def test_stage_trainable_sets(tiny_cfg, tokenizer):
    align = parameter_counts(build(tiny_cfg, tokenizer, "stage=align"))
    assert align["vision"][0] == 0 and align["llm"][0] == 0 and "llm (LoRA)" not in align
    for part in ("projector.sfe", "projector.dfi", "projector.spatial_head", "projector.patch_head"):
        assert align[part][1] == 0 and align[part][0] > 0, part  # DFI trains too (the official script forgot it)
    finetune = parameter_counts(build(tiny_cfg, tokenizer, "stage=finetune"))
    assert finetune["llm (LoRA)"][0] > 0 and finetune["llm"][0] == 0 and finetune["vision"][0] == 0


def test_batched_generation_equals_unbatched(tiny_cfg, tokenizer):
    torch.manual_seed(0)
    model = build(tiny_cfg, tokenizer)
    n = model.num_visual_tokens
    prompts = [
        ids_with_image(tokenizer, "USER:", " what colour is the top left? ASSISTANT:", n),
        ids_with_image(tokenizer, "USER:", " count? ASSISTANT:", n),
    ]
    pixels = torch.randn(2, 3, 336, 336)
    single = [
        model.generate(
            torch.tensor([p]),
            torch.ones(1, len(p), dtype=torch.long),
            pixels[i : i + 1],
            max_new_tokens=5,
            pad_token_id=tokenizer.pad_token_id,
        )[0].tolist()
        for i, p in enumerate(prompts)
    ]
    length = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    batched = model.generate(ids, mask, pixels, max_new_tokens=5, pad_token_id=tokenizer.pad_token_id).tolist()
    for one, row in zip(single, batched):
        assert row[: len(one)] == one
    with pytest.raises(ValueError, match="left-padded"):
        right = torch.tensor([p + [tokenizer.pad_token_id] * (length - len(p)) for p in prompts])
        model.generate(right, mask.flip(1), pixels)


def test_non_finite_visual_features_raise_instead_of_being_hidden(tiny_cfg, tokenizer):
    model = build(tiny_cfg, tokenizer)
    pixels = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        model.projector.patch_head[0].weight[0, 0] = float("nan")
        with pytest.raises(RuntimeError, match="non-finite values in projector 'pooling' output"):
            model.visual_tokens(pixels)
