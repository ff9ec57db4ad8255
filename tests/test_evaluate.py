import numpy as np
import pytest
import torch

from dit_core.evaluate import frechet_distance, load_classifier, score_samples


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    a -= a.mean(0)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    assert frechet_distance(a, a + np.array([1.0, 2.0, 0.0])) == pytest.approx(5.0, rel=1e-9)
    # N(0, I) vs N(0, 4I) in d dims: d * (1 + 4 - 2*2) = d
    b = a * 2
    assert frechet_distance(a, b) == pytest.approx(np.trace(np.cov(a, rowvar=False)), rel=1e-6)


def test_classifier_reads_mnist_at_99_percent():
    clf, acc = load_classifier("cpu")
    assert acc >= 0.99, acc


def test_real_digits_score_perfectly_and_noise_does_not(mnist):
    test_idx = torch.arange(500)
    from dit_core.data import load_mnist
    test = load_mnist("test")
    x, y = test.gather(test_idx)
    real = score_samples(x, y)
    assert real["accuracy"] > 0.97 and real["fid"] < 3 * real["fid_floor"] + 1.0
    noise = score_samples(torch.rand_like(x) * 2 - 1, y)
    assert noise["accuracy"] < 0.3 and noise["fid"] > 10 * real["fid"]
