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


def test_progress_default(monkeypatch):
    for name in ("MINIGPT_PROGRESS", "PYTEST_CURRENT_TEST", "PYTEST_XDIST_WORKER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MINIGPT_PROGRESS", "1")
    assert config.progress_default() is True
    monkeypatch.setenv("MINIGPT_PROGRESS", "0")
    assert config.progress_default() is False
    monkeypatch.setenv("MINIGPT_PROGRESS", "maybe")
    with pytest.raises(ValueError, match="MINIGPT_PROGRESS"):
        config.progress_default()
    monkeypatch.delenv("MINIGPT_PROGRESS")
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/x.py::test (call)")  # what kernels under nbval inherit
    assert config.progress_default() is False


def test_book_build_turns_bars_off(monkeypatch):
    """The book's Sphinx extension sets MINIGPT_PROGRESS=0 before any chapter's kernel starts."""
    import importlib.util
    from pathlib import Path

    monkeypatch.delenv("MINIGPT_PROGRESS", raising=False)
    spec = importlib.util.spec_from_file_location(
        "offline_html", Path(__file__).parents[1] / "book" / "_ext" / "offline_html.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class App:
        def connect(self, *args):
            pass

    module.setup(App())
    assert config.progress_default() is False
