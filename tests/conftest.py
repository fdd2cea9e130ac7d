import pytest
import torch

from minigpt.data import load_shakespeare


@pytest.fixture(scope="session")
def corpus():
    """Tiny Shakespeare (from MINIGPT_DATA_DIR in CI, else the user cache or a download)."""
    return load_shakespeare()


@pytest.fixture
def tiny_config():
    from minigpt.model import GPTConfig

    return GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32)


class ToyRegression(torch.nn.Module):
    """One weight w, prediction w * x, squared error. With train targets 2 and validation targets 1 and w
    starting at 0, the validation loss falls until w passes 1 and rises after: its best step is known."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, y, loss_fn=None, reduction="mean"):
        losses = (self.w * x - y) ** 2
        return None, {"mean": losses.mean, "sum": losses.sum, "none": lambda: losses}[reduction]()


@pytest.fixture
def toy_model():
    return ToyRegression()
