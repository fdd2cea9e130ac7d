import pytest
import torch

from minigpt import config


def test_scale_default_follows_cuda(monkeypatch):
    monkeypatch.delenv("MINIGPT_SCALE", raising=False)
    assert config.scale() == ("full" if torch.cuda.is_available() else "small")


@pytest.mark.parametrize("value, expected", [("small", "small"), ("FULL", "full"), (" small ", "small")])
def test_scale_from_env(monkeypatch, value, expected):
    monkeypatch.setenv("MINIGPT_SCALE", value)
    assert config.scale() == expected


def test_bad_scale_names_the_variable(monkeypatch):
    monkeypatch.setenv("MINIGPT_SCALE", "huge")
    with pytest.raises(ValueError, match="MINIGPT_SCALE"):
        config.scale()


def test_seed_from_env(monkeypatch):
    monkeypatch.delenv("MINIGPT_SEED", raising=False)
    assert config.base_seed() == 0
    monkeypatch.setenv("MINIGPT_SEED", "7")
    assert config.base_seed() == 7
    assert config.seeds(3) == [7, 8, 9]
    for bad in ("abc", "-1", "1.5"):
        monkeypatch.setenv("MINIGPT_SEED", bad)
        with pytest.raises(ValueError, match="MINIGPT_SEED"):
            config.base_seed()


def test_seed_everything_reproduces_draws():
    g1 = config.seed_everything(3)
    a = (torch.rand(4), torch.rand(4, generator=g1))
    g2 = config.seed_everything(3)
    b = (torch.rand(4), torch.rand(4, generator=g2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="seed"):
        config.seed_everything(-1)


def test_device(monkeypatch):
    monkeypatch.setenv("MINIGPT_DEVICE", "cpu")
    assert config.device() == torch.device("cpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv("MINIGPT_DEVICE", "cuda")
        with pytest.raises(ValueError, match="MINIGPT_DEVICE"):
            config.device()


def test_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("MINIGPT_THREADS", "1")
        assert config.configure_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("MINIGPT_THREADS", "0")
        with pytest.raises(ValueError, match="MINIGPT_THREADS"):
            config.configure_threads()
        monkeypatch.delenv("MINIGPT_THREADS")
        monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
        assert config.configure_threads() == 1
    finally:
        torch.set_num_threads(before)
