"""Token conventions shared by the data and the model layers, in the base layer so that neither imports the other
for them: the label that marks a token as not supervised, the image placeholder, and the one computation every
layer makes from that label. Imports nothing of the package (and nothing at all at run time)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the function below only calls tensor methods
    import torch

# The label of a token the loss ignores (torch's cross_entropy default ignore_index, LLaVA's IGNORE_INDEX).
IGNORE_INDEX = -100
# The image placeholder in record text and prompts; the tokenizers add it as a special token, and a batch repeats
# its id once per visual token.
IMAGE_TOKEN = "<image>"


def supervised_logit_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose next token is supervised in at least one row of ``labels`` (B, L), ascending:
    where a causal LM needs logits for the loss (LlavaSP.forward; the collators compute them on the host)."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
