import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never downloads
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = [
    # A random narrow encoder on the paper's 24x24 grid (not the shipped pretrained 12x12 one): every arm composes.
    "model.vision.name_or_path=null",
    "model.vision.patch_size=14",
    "model.vision.hidden_size=32",
    "model.vision.num_layers=2",
    "model.vision.intermediate_size=64",
    "model.llm.hidden_size=64",
    "model.llm.intermediate_size=128",
    "model.lora.r=8",
    "model.lora.alpha=16",
    "projector.sp_width=16",
]


@pytest.fixture(scope="session")
def tokenizer():
    from lightning_sp.data.tokenizer import load_tokenizer
    from lightning_sp.paths import resolve

    return load_tokenizer(str(resolve("data/tokenizer")))


@pytest.fixture
def tiny_cfg():
    """Compose the embedded default with narrower widths; extra overrides as arguments."""
    from lightning_sp.config import compose

    def make(*overrides):
        return compose([*TINY, *overrides])

    return make


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: intra-op threads only add spin-wait (3x slower on a busy 2-core box)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
