"""Model internals as pictures: DFI cross-attention, LLM attention over the visual tokens, question and answers.

Two steps, kept apart so that tests and notebooks can check the numbers without drawing anything:

1. :func:`compute_maps` (or :func:`compute_sample_maps` for one image + prompt) runs the model on a few samples
   and returns :class:`AttentionMaps` -- plain numpy arrays:

   * ``sp_attention``: the attention of each of the S spatial (SP) tokens, from ``projector.last_attention``.
     ``sp_attention_kind == "dfi"``: the Detail Feature Integrator's weights over its n x n K/V tokens, (S, n, n).
     ``sp_attention_map`` (S, H, W) spreads each K/V token's weight evenly over its receptive field (the k x k
     patches its stride-2 convolution reads), so every map still sums to 1 and lies where the K/V token looked
     -- a bilinear resize of the 5 x 5 grid would put token (0, 0), which reads the top-left 16 x 16 patches, at
     the image corner. The receptive fields overlap (16 x 16 windows at stride 2 on 24 x 24 all read the
     centre), so even uniform attention piles up in the middle; the overlay therefore shows
     ``sp_attention_shown`` = map / (the map uniform attention would give): 1 is "as uniform", above 1 is where
     this SP token looks more than average. ``"extractor"`` (SP arms whose extractor attends and that have no
     DFI: ``cropping_transformer``, ``learned_queries``): weights over the patch grid, (S, gh, gw), shown as is.
     ``None`` for projectors without attention (``mlp``, ``conv49``, SFE arms without DFI).
   * ``llm_sp`` (S,) and ``llm_patches`` (gh, gw): the LLM's attention from the answer to the visual tokens,
     averaged over layers, heads and the rows that produced the answer tokens (the row of the token *before*
     each answer token). Values are fractions of that attention (the rows sum to 1 over the whole sequence).
     The LLM must run with eager attention to return weights; :func:`eager_attention` (lightning_sp/thirdparty/
     transformers_internals.py) switches the
     implementation for that one pass on one sample and restores it, so training keeps SDPA/flash.
   * ``windows``: what each SP token summarises, in pixels: a crop box (cropping) or the cells of the pooling
     grid (pooling), from ``projector.sp_boxes()`` / the SFE sides, scaled from the patch grid to the image.
   * ``asked_cell`` and ``llm_first_row``: the cell a synthetic question names ("... in the top left cell?")
     and, per layer, the attention over the visual tokens of the row that predicts the first answer token (the
     last prompt token). ``attention_on_target`` turns them into the number the validation logs
     (``val/attention_on_target``, lightning_sp/callbacks/attention_metrics.py): the share of that row's patch
     attention on the asked cell relative to uniform, in its best layer; ``sp_attention_spread`` how far the SP
     tokens' own attention is from uniform.

Where the answer looks, as numbers: :func:`named_cell`, :func:`cell_patches`, :func:`attention_on_cell`,
:func:`sp_share_over_uniform`, :func:`max_over_uniform`, :func:`normalised_entropy` are pure functions of
tensors, shared by the pictures and the validation metrics so both report the same quantity;
:func:`prompt_attention` gives that last-prompt-token row for a batch of left-padded prompts at the cost of
about one ordinary forward (:func:`last_position_attention`).

2. :func:`sp_attention_figure`, :func:`llm_figure` return matplotlib figures; :func:`render_sp_attention`,
   :func:`render_llm` the same as (H, W, 3) uint8 arrays (TensorBoard); :func:`qa_markdown` the question, the
   target and the prediction; :func:`save_pngs` writes the figures.

Nothing here hard-codes 576 patches, a 24 x 24 grid or six SP tokens: all come from ``projector.layout``.
Figures are built with ``matplotlib.figure.Figure`` (no pyplot): no global state, any backend, thread-safe.

Modules: ``geometry`` (windows and footprints in pixels), ``measures`` (where the answer looks, as numbers),
``maps`` (computing :class:`AttentionMaps`), ``drawing`` (figures and files); this package re-exports their public
names.
"""

from lightning_sp.thirdparty.transformers_internals import attn_implementation, eager_attention
from lightning_sp.viz.drawing import (
    figure_to_array,
    llm_figure,
    overlay,
    qa_markdown,
    render_llm,
    render_sp_attention,
    save_pngs,
    sp_attention_figure,
    target_caption,
)
from lightning_sp.viz.geometry import (
    SPWindow,
    denormalize,
    dfi_footprint,
    pooling_cells,
    scale_box,
    sp_windows,
    upsample_to_image,
)
from lightning_sp.viz.maps import (
    AttentionMaps,
    answer_attention_by_layer,
    compute_maps,
    compute_sample_maps,
    llm_answer_attention,
    question_markers,
    question_text,
    sp_attention_images,
    sp_attention_kind,
)
from lightning_sp.viz.measures import (
    CELLS,
    attention_on_cell,
    cell_patches,
    eager_forward,
    last_position_attention,
    left_trimmed,
    max_over_uniform,
    named_cell,
    normalised_entropy,
    prompt_attention,
    sp_share_over_uniform,
)

__all__ = [
    "attn_implementation",
    "eager_attention",
    "denormalize",
    "scale_box",
    "pooling_cells",
    "SPWindow",
    "sp_windows",
    "dfi_footprint",
    "upsample_to_image",
    "CELLS",
    "named_cell",
    "cell_patches",
    "attention_on_cell",
    "sp_share_over_uniform",
    "max_over_uniform",
    "normalised_entropy",
    "eager_forward",
    "last_position_attention",
    "left_trimmed",
    "prompt_attention",
    "AttentionMaps",
    "question_text",
    "answer_attention_by_layer",
    "llm_answer_attention",
    "compute_sample_maps",
    "sp_attention_images",
    "sp_attention_kind",
    "compute_maps",
    "question_markers",
    "overlay",
    "sp_attention_figure",
    "llm_figure",
    "target_caption",
    "figure_to_array",
    "render_sp_attention",
    "render_llm",
    "qa_markdown",
    "save_pngs",
]
