import hashlib
import urllib.error

import pytest
import torch

from minigpt import data
from minigpt.data import CharTokenizer, DataError, random_blocks


def test_corpus_is_nanogpt_split(corpus):
    assert corpus.vocab_size == 65
    n = len(corpus.train) + len(corpus.val)
    assert n == 1_115_394
    assert len(corpus.train) == int(n * 0.9)
    assert corpus.train.dtype == torch.long


def test_tokenizer_round_trip(corpus):
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    assert corpus.tokenizer.decode(corpus.tokenizer.encode(text)) == text
    with pytest.raises(ValueError, match="vocabulary"):
        corpus.tokenizer.encode("café")
    with pytest.raises(ValueError, match="ids"):
        corpus.tokenizer.decode([0, 65])
    with pytest.raises(ValueError, match="chars"):
        CharTokenizer("")


def test_random_blocks_are_shifted_windows():
    stream = torch.arange(1000)
    x, y = random_blocks(stream, 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16)
    assert torch.equal(y, x + 1)  # on arange the next token is id + 1
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # contiguous windows
    x2, _ = random_blocks(stream, 8, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="block_size"):
        random_blocks(torch.arange(10), 2, 10)
    with pytest.raises(ValueError, match="1-D"):
        random_blocks(torch.zeros(4, 4, dtype=torch.long), 2, 2)


def test_batch_fn(corpus):
    get_batch = corpus.batch_fn(4, 32)
    x, y = get_batch("val", torch.Generator().manual_seed(1))
    assert x.shape == (4, 32) and int(x.max()) < 65
    with pytest.raises(ValueError, match="split"):
        get_batch("test", None)


# --- the download and checksum paths, without network: a file:// URL stands in for the server


def _serve(tmp_path, content: bytes):
    src = tmp_path / "served.txt"
    src.write_bytes(content)
    return src.as_uri(), hashlib.sha256(content).hexdigest()


def test_download_verifies_and_caches(tmp_path, monkeypatch):
    url, digest = _serve(tmp_path, b"To be, or not to be")
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(tmp_path / "cache"))
    path = data.shakespeare_path(url=url, sha256=digest)
    assert path == tmp_path / "cache" / "tinyshakespeare" / "input.txt"
    assert path.read_bytes() == b"To be, or not to be"
    # a second call uses the cache: the source may vanish
    (tmp_path / "served.txt").unlink()
    assert data.shakespeare_path(url=url, sha256=digest) == path


def test_download_with_wrong_checksum_leaves_nothing(tmp_path, monkeypatch):
    url, _ = _serve(tmp_path, b"not Shakespeare")
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="SHA-256"):
        data.shakespeare_path(url=url, sha256="0" * 64)
    folder = tmp_path / "cache" / "tinyshakespeare"
    assert list(folder.iterdir()) == []  # neither the bad file nor a temporary one remains


def test_corrupt_cached_file_says_what_to_do(tmp_path, monkeypatch):
    folder = tmp_path / "tinyshakespeare"
    folder.mkdir()
    (folder / "input.txt").write_text("corrupted")
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="delete it and run again"):
        data.shakespeare_path()


def test_no_network_says_what_to_do(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="MINIGPT_DATA_DIR"):
        data.shakespeare_path()
    assert list((tmp_path / "tinyshakespeare").iterdir()) == []


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("MINIGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.data_dir() == tmp_path / "minigpt"


# --- scikit-learn's bundled sets


@pytest.mark.parametrize("loader, n, d, task", [
    (data.load_diabetes, 442, 10, "regression"),
    (data.load_breast_cancer, 569, 30, "classification"),
    (data.load_digits, 1797, 64, "classification"),
])
def test_tabular_splits(loader, n, d, task):
    ds = loader()
    sizes = [len(ds.X_train), len(ds.X_val), len(ds.X_test)]
    assert sum(sizes) == n and ds.n_features == d and ds.task == task
    assert abs(sizes[0] / n - 0.6) < 0.01
    # standardized with the training split's statistics
    assert ds.X_train.mean(0).abs().max() < 1e-5
    std = ds.X_train.std(0, unbiased=False)
    assert ((std - 1).abs() < 1e-4).logical_or(std == 0).all()
    # fixed: the same split every call
    again = loader()
    assert torch.equal(ds.X_test, again.X_test) and torch.equal(ds.y_test, again.y_test)
    if task == "classification":
        assert ds.y_train.dtype == torch.long and ds.n_classes == int(ds.y_train.max()) + 1
        # stratified: class shares agree across splits
        share = [torch.bincount(y, minlength=ds.n_classes).float() / len(y) for y in (ds.y_train, ds.y_test)]
        assert (share[0] - share[1]).abs().max() < 0.03
    else:
        assert abs(float(ds.y_train.mean())) < 1e-5 and ds.y_std > 1


def test_tabular_bad_fractions():
    with pytest.raises(ValueError, match="fractions"):
        data.load_diabetes(fractions=(0.5, 0.5, 0.5))
