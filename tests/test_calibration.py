"""cxrdist.stats.calibration: ECE, Brier and bins against plain numpy; temperature scaling on fake models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cxrdist.stats.calibration import (
    T_MAX,
    T_MIN,
    apply_temperature,
    brier_score,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
    softmax,
)

K = 4


def calibrated_draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits, and labels drawn from softmax(logits): a perfectly calibrated model by construction."""
    logits = rng.normal(scale=1.5, size=(n, K)) + np.array([0.5, 0, 0, -0.5])
    cumulative = np.cumsum(softmax(logits), 1)
    labels = (rng.random(n)[:, None] > cumulative).sum(1)
    return logits, np.minimum(labels, K - 1)


def ece_by_hand(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """The textbook loop: bins (lower, upper], |accuracy - confidence| weighted by the bin's share."""
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lower, upper in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lower) & (conf <= upper)
        if in_bin.any():
            ece += in_bin.mean() * abs((pred[in_bin] == labels[in_bin]).mean() - conf[in_bin].mean())
    return ece


def test_ece_bins_and_brier_equal_plain_numpy():
    rng = np.random.default_rng(0)
    logits, labels = calibrated_draw(rng, 2000)
    probs = softmax(2 * logits)
    # Confidences exactly on bin edges belong to the lower bin, as in the loop.
    edges = np.linspace(0, 1, 16)
    probs[:3] = [[edges[6], (1 - edges[6]) / 3, (1 - edges[6]) / 3, (1 - edges[6]) / 3]] * 3
    probs[3] = [1.0, 0, 0, 0]
    assert expected_calibration_error(probs, labels) == pytest.approx(ece_by_hand(probs, labels), abs=1e-12)
    brier = np.mean(
        [sum((probs[i, k] - (labels[i] == k)) ** 2 for k in range(K)) for i in range(len(labels))]
    )
    assert brier_score(probs, labels) == pytest.approx(brier, abs=1e-12)

    bins = reliability_bins(probs, labels)
    assert sum(bins["count"]) == 2000 and len(bins["count"]) == 15 and len(bins["edges"]) == 16
    conf = probs.max(1)
    for i, (lower, upper) in enumerate(zip(edges[:-1], edges[1:])):
        in_bin = (conf > lower) & (conf <= upper)
        assert bins["count"][i] == in_bin.sum()
        if in_bin.any():
            assert bins["confidence"][i] == pytest.approx(conf[in_bin].mean(), abs=1e-12)
            assert bins["accuracy"][i] == pytest.approx((probs.argmax(1) == labels)[in_bin].mean(), abs=1e-12)
        else:
            assert bins["confidence"][i] is None and bins["accuracy"][i] is None
    assert bins["count"][6] >= 3  # the edge cases landed in bin (0.333, 0.4]
    # Torch float32 input gives the same numbers (to float32 rounding of the inputs).
    t = torch.from_numpy(probs).float()
    assert expected_calibration_error(t, torch.from_numpy(labels)) == pytest.approx(
        ece_by_hand(t.double().numpy(), labels), abs=1e-12
    )


def test_brier_extremes():
    labels = np.array([0, 1, 2, 3])
    assert brier_score(np.eye(K)[labels], labels) == 0.0
    assert brier_score(np.full((4, K), 1 / K), labels) == pytest.approx(1 - 1 / K)
    assert brier_score(np.eye(K)[(labels + 1) % K], labels) == pytest.approx(2.0)  # confidently wrong


def test_calibrated_model_has_ece_near_zero_and_temperature_near_one():
    rng = np.random.default_rng(1)
    logits, labels = calibrated_draw(rng, 20000)
    assert expected_calibration_error(softmax(logits), labels) < 0.015
    assert 0.95 < fit_temperature(logits, labels) < 1.05


def test_temperature_undoes_overconfidence_on_a_separate_draw():
    rng = np.random.default_rng(2)
    val_logits, val_labels = calibrated_draw(rng, 4000)
    test_logits, test_labels = calibrated_draw(rng, 4000)
    t = fit_temperature(5 * val_logits, val_labels)  # a model 5x too confident
    assert 4.5 < t < 5.5
    report = calibration_report(5 * test_logits, test_labels, temperature=t)
    before, after = report["before"], report["after"]
    assert before["ece"] > 0.15 and after["ece"] < before["ece"] / 4
    assert after["nll"] < before["nll"] and after["brier"] < before["brier"]
    # Temperature never changes a prediction.
    assert np.array_equal(apply_temperature(5 * test_logits, t).argmax(1), test_logits.argmax(1))
    # NLL at the fitted T is the minimum over T: nearby temperatures do no better on the split it was fit on.
    nll = negative_log_likelihood(5 * val_logits, val_labels, t)
    assert nll <= negative_log_likelihood(5 * val_logits, val_labels, t * 1.01)
    assert nll <= negative_log_likelihood(5 * val_logits, val_labels, t / 1.01)
    json.dumps(report, allow_nan=False)


def test_fit_temperature_is_deterministic_finite_and_clipped():
    rng = np.random.default_rng(3)
    logits, labels = calibrated_draw(rng, 500)
    assert fit_temperature(logits, labels) == fit_temperature(logits.copy(), labels.copy())
    # Perfectly separated: the NLL keeps falling as T -> 0; clipped.
    assert fit_temperature(10 * np.eye(K)[labels], labels) == T_MIN
    # Confidently wrong: the best is as flat as allowed.
    assert fit_temperature(10 * np.eye(K)[(labels + 1) % K], labels) == T_MAX
    # Constant rows: T changes nothing.
    assert fit_temperature(np.zeros((10, K)), np.arange(10) % K) == 1.0
    # The minimum over a fine grid of temperatures agrees, for under- and over-confident models alike.
    grid = np.geomspace(T_MIN, T_MAX, 401)  # steps of 1.5%
    for scale in (0.3, 1.0, 5.0):
        fitted = fit_temperature(scale * logits, labels)
        nll = [negative_log_likelihood(scale * logits, labels, g) for g in grid]
        assert negative_log_likelihood(scale * logits, labels, fitted) <= min(nll) + 1e-12
        assert abs(np.log(fitted / grid[int(np.argmin(nll))])) <= np.log(grid[1] / grid[0])
    # Torch float32 logits work the same.
    t = fit_temperature(torch.from_numpy(logits).float(), torch.from_numpy(labels))
    assert t == pytest.approx(fit_temperature(logits, labels), rel=1e-5)


def test_nll_matches_torch_cross_entropy():
    rng = np.random.default_rng(4)
    logits, labels = calibrated_draw(rng, 300)
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits / 1.7), torch.from_numpy(labels))
    assert negative_log_likelihood(logits, labels, 1.7) == pytest.approx(float(expected), abs=1e-12)


def test_log_probabilities_are_logits():
    rng = np.random.default_rng(5)
    logits, labels = calibrated_draw(rng, 300)
    log_probs = torch.from_numpy(logits).float().log_softmax(1)
    report = calibration_report(log_probs, labels)
    assert report["before"]["ece"] == pytest.approx(
        expected_calibration_error(softmax(logits), labels), abs=1e-6
    )
    assert report["after"] is None and report["temperature"] is None


def test_inputs_are_checked():
    labels = np.array([0, 1])
    with pytest.raises(ValueError, match="probabilities"):
        expected_calibration_error(np.array([[3.0, -1, 0, 0], [0, 2.0, 0, 0]]), labels)
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(np.zeros((2, K)), 0.0)
    with pytest.raises(ValueError, match="at least one sample"):
        fit_temperature(np.zeros((0, K)), np.zeros(0, dtype=np.int64))
    assert expected_calibration_error(np.zeros((0, K)), np.zeros(0, dtype=np.int64)) is None
