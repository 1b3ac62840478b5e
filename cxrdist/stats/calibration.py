"""Calibration: do the predicted probabilities mean what they say? ECE, Brier, NLL, temperature scaling.

Input: per-sample arrays gathered once by evaluation, torch tensors or numpy arrays, ``labels`` int64
``(N,)`` with class ids in ``0..K-1`` and either

- ``probs`` float ``(N, K)``: probabilities, rows summing to 1 (softmax output, or its TTA average), or
- ``logits`` float ``(N, K)``: any real scores whose softmax is the model's prediction. Log-probabilities
  are logits too (softmax(log p) = p), so a caller holding only probabilities passes ``log(p)``, best
  computed as ``log_softmax`` so that nothing underflows to ``-inf``.

Definitions (computed in float64):

- Top-label confidence: the largest probability of a row; the prediction: its argmax (first on ties).
- Reliability bins: `N_BINS` (15) equal-width bins over confidence; bin i holds confidences in
  ``(edges[i], edges[i+1]]`` with ``edges = linspace(0, 1, 16)`` (a confidence of exactly 0 goes to bin 0).
  Per bin: count, mean confidence and accuracy (None when the bin is empty).
- ECE = sum over bins of (count / N) * |accuracy - mean confidence|; 0 is perfect, at most 1.
- Brier score = mean over samples of sum_k (p_k - y_k)^2, y one-hot: the original multiclass definition
  (Brier 1950), NOT divided by K, so it lies in [0, 2]; 0 is perfect, a uniform guess scores 1 - 1/K.
- NLL = mean over samples of -log softmax(logits / T)[label].
- Temperature scaling: probs = softmax(logits / T) with one scalar T > 0 fitted on the validation split
  (`fit_temperature`). T > 1 softens over-confident predictions. Dividing by T never changes a row's
  argmax, so accuracy and every confusion-matrix metric stay the same; ROC-AUC can move slightly (scores
  are compared across samples) and ECE, Brier and NLL change.
"""

from __future__ import annotations

import numpy as np

from cxrdist.stats.arrays import as_scores, sample_arrays

N_BINS = 15
T_MIN, T_MAX = 0.05, 20.0  # fitted temperatures are clipped to this range
_PROB_TOLERANCE = 1e-3  # float32 softmax rows sum to 1 within ~1e-6; anything further is not probabilities


def _probabilities(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = sample_arrays(probs, labels)
    if probs.size and (
        probs.min() < -_PROB_TOLERANCE
        or probs.max() > 1 + _PROB_TOLERANCE
        or np.abs(probs.sum(1) - 1).max() > _PROB_TOLERANCE
    ):
        raise ValueError("expected probabilities (rows in [0, 1] summing to 1); pass softmax(logits)")
    return probs, labels


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax of a float64 ``(N, K)`` array, stable for any finite logits."""
    shifted = logits - logits.max(1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(1, keepdims=True)


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """``softmax(logits / temperature)``: float64 ``(N, K)`` numpy probabilities."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return softmax(as_scores(logits) / temperature)


def reliability_bins(probs, labels, n_bins: int = N_BINS) -> dict:
    """Reliability-diagram bins of the top-label confidence (JSON-able).

    Returns ``{"edges": [n_bins + 1 floats], "count": [n_bins ints], "confidence": [mean confidence or
    None], "accuracy": [accuracy or None]}``; see the module docstring for the bin boundaries.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    probs, labels = _probabilities(probs, labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    confidence = probs.max(1) if probs.size else np.zeros(0)
    correct = (probs.argmax(1) == labels) if probs.size else np.zeros(0, dtype=bool)
    # searchsorted(side="left") - 1 puts c in the bin with edges[i] < c <= edges[i+1].
    bin_of = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(bin_of, minlength=n_bins)
    conf_sum = np.bincount(bin_of, weights=confidence, minlength=n_bins)
    correct_sum = np.bincount(bin_of, weights=correct, minlength=n_bins)
    return {
        "edges": edges.tolist(),
        "count": count.tolist(),
        "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, count)],
        "accuracy": [float(s / c) if c else None for s, c in zip(correct_sum, count)],
    }


def ece_from_bins(bins: dict) -> float | None:
    """ECE of `reliability_bins` output: sum of (count / N) |accuracy - confidence|; None if N = 0."""
    total = sum(bins["count"])
    if total == 0:
        return None
    gaps = (
        n * abs(acc - conf)
        for n, acc, conf in zip(bins["count"], bins["accuracy"], bins["confidence"])
        if n  # empty bins weigh nothing
    )
    return float(sum(gaps) / total)


def expected_calibration_error(probs, labels, n_bins: int = N_BINS) -> float | None:
    """Expected calibration error over `n_bins` equal-width confidence bins; None without samples."""
    return ece_from_bins(reliability_bins(probs, labels, n_bins))


def brier_score(probs, labels) -> float | None:
    """Mean over samples of sum_k (p_k - y_k)^2, in [0, 2] (not divided by K); None without samples."""
    probs, labels = _probabilities(probs, labels)
    if not len(labels):
        return None
    onehot = np.eye(probs.shape[1])[labels]
    return float(((probs - onehot) ** 2).sum(1).mean())


def negative_log_likelihood(logits, labels, temperature: float = 1.0) -> float | None:
    """Mean of -log softmax(logits / temperature)[label] (natural log); None without samples."""
    logits, labels = sample_arrays(logits, labels)
    if not len(labels):
        return None
    z = logits / temperature
    top = z.max(1)
    log_norm = top + np.log(np.exp(z - top[:, None]).sum(1))
    return float((log_norm - z[np.arange(len(labels)), labels]).mean())


def _nll_derivatives(logits: np.ndarray, labels: np.ndarray, beta: float) -> tuple[float, float]:
    """First and second derivative in beta of NLL(softmax(beta * logits)): mean(E_p[z] - z_label) and
    mean(Var_p[z]) >= 0, so the NLL is convex in beta and its slope non-decreasing."""
    p = softmax(beta * logits)
    mean_z = (p * logits).sum(1)
    slope = float((mean_z - logits[np.arange(len(labels)), labels]).mean())
    curvature = float(((p * logits**2).sum(1) - mean_z**2).mean())
    return slope, curvature


def fit_temperature(logits, labels) -> float:
    """The T in [`T_MIN`, `T_MAX`] minimising the NLL of softmax(logits / T): deterministic and finite.

    The NLL is convex in beta = 1 / T, so its slope is monotone in beta: Newton steps on the slope, kept
    inside a shrinking bracket [beta_lo, beta_hi] where the slope changes sign (a bisection step whenever
    Newton would leave it), converge to the unique minimum to ~1e-10 relative in a few dozen softmaxes
    at most. When the minimum lies beyond the range the result is the clipped end (a perfectly separated
    split wants T -> 0, a confidently wrong one T -> inf). Logits whose NLL does not depend on T (every
    row constant) give 1.0. Fit it on the validation split, never on the split you report.
    """
    logits, labels = sample_arrays(logits, labels)
    if not len(labels):
        raise ValueError("fit_temperature needs at least one sample")
    lo, hi = 1 / T_MAX, 1 / T_MIN  # beta
    slope_lo, _ = _nll_derivatives(logits, labels, lo)
    slope_hi, _ = _nll_derivatives(logits, labels, hi)
    if slope_lo >= 0 and slope_hi <= 0:  # flat: T changes nothing
        return 1.0
    if slope_lo >= 0:
        return T_MAX
    if slope_hi <= 0:
        return T_MIN
    beta = 1.0
    for _ in range(200):
        slope, curvature = _nll_derivatives(logits, labels, beta)
        if abs(slope) <= 1e-12:  # converged at beta
            break
        if slope < 0:
            lo = beta
        else:
            hi = beta
        if hi - lo <= 1e-10 * hi:  # the bracket has closed around the minimum
            beta = (lo + hi) / 2
            break
        newton = beta - slope / curvature if curvature > 0 else np.nan
        beta = newton if lo < newton < hi else float(np.sqrt(lo * hi))
    return float(np.clip(1 / beta, T_MIN, T_MAX))


def calibration_report(logits, labels, temperature: float | None = None, n_bins: int = N_BINS) -> dict:
    """ECE, Brier, NLL and reliability bins of one split, before and (given T) after temperature scaling.

    Returns (JSON-able)::

        {"n_bins": 15, "temperature": T or None,
         "before": {"ece", "brier", "nll", "bins": reliability_bins(...)},
         "after": the same with softmax(logits / T), or None without a temperature}
    """

    def measures(t: float) -> dict:
        probs = apply_temperature(logits_np, t)
        bins = reliability_bins(probs, labels_np, n_bins)
        return {
            "ece": ece_from_bins(bins),
            "brier": brier_score(probs, labels_np),
            "nll": negative_log_likelihood(logits_np, labels_np, t),
            "bins": bins,
        }

    logits_np, labels_np = sample_arrays(logits, labels)
    return {
        "n_bins": n_bins,
        "temperature": temperature,
        "before": measures(1.0),
        "after": measures(temperature) if temperature is not None else None,
    }
