"""Statistics of gathered scores: pure functions of per-sample arrays, the same on every rank.

Evaluation gathers each split's scores once (`cxrdist.evaluate.SplitScores`); everything reported is
computed from them here, so nothing in this package knows about ranks, devices or files:

- `registry`: every metric's key in the metrics dict and its label, named once for tables and the report;
- `formulas`: the one definition of every metric, vectorised over confusion matrices (NaN = undefined);
- `metrics`: the confusion matrix and `summarize`, the JSON-able metrics of one split (None = undefined);
- `uncertainty`: stratified bootstrap intervals for every metric `summarize` reports;
- `calibration`: ECE, Brier, NLL, reliability bins, temperature scaling;
- `operating_points`: ROC curves and thresholds at a target sensitivity or specificity;
- `arrays`: the input contract all of them check (scores ``(N, K)`` finite, labels ``(N,)`` in ``0..K-1``).

The modules `cxrdist.metrics`, `cxrdist.uncertainty`, `cxrdist.calibration` and `cxrdist.operating_points`
re-export these for code written before the package existed.
"""
