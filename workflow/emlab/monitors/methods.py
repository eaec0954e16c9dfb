"""The monitors. Each one scores texts from the shared feature arrays (:class:`~.features.Features`) through one
interface: ``fit(features, train_idx)`` (a no-op for untrained monitors), then ``score(features, idx)``; a higher
score means "positive" (toxic, sarcastic, incorrect, ...).

    zero_shot               the model's own answer: logit(Yes) - logit(No) to the task's question
    raw_last, raw_mean      logistic probes on the residual stream (last token; mean over tokens)
    prompted_suffix,        logistic probes on the last token of the monitoring prompt (question after the text;
    prompted_prefix_suffix  task description before it as well)
    sae                     a logistic probe on every SAE latent, max-pooled over tokens
    sae_topk                the same on the ``sae_top_k`` latents whose class means differ most on the training split
    stacked                 a 2-feature logistic fit of a probe's score and the zero-shot score
    persona_latent          one given SAE latent's max-pooled activation (no training)

Probes standardise their features on the training split and pick the L2 strength by stratified cross-validation
(``LogisticRegressionCV``, log loss) when every class has at least 2 training texts, and use C = 1 otherwise.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..schema import ConfigError
from .features import Features

METHODS = ("zero_shot", "raw_last", "raw_mean", "prompted_suffix", "prompted_prefix_suffix", "sae", "sae_topk",
           "stacked", "persona_latent")
UNTRAINED = ("zero_shot", "persona_latent")
PROBE_FEATURES = {"raw_last": "raw_last", "raw_mean": "raw_mean", "prompted_suffix": "prompted_suffix",
                  "prompted_prefix_suffix": "prompted_prefix_suffix", "sae": "sae_max"}


# Inverse L2 strengths tried by cross-validation. On standardised features, C > 100 is as good as unregularised,
# and a tolerance of 1e-3 moves no AUROC measurably while fitting a few times faster than the default.
PROBE_CS = np.logspace(-4, 2, 7)


class MonitorConfigError(ConfigError):
    """A monitor that cannot be built from the configuration; the message names the config key."""


class Monitor(Protocol):
    name: str

    def fit(self, feats: Features, train_idx: np.ndarray) -> None: ...

    def score(self, feats: Features, idx: np.ndarray) -> np.ndarray: ...


def neg_log_loss(estimator, x: np.ndarray, y: np.ndarray) -> float:
    """Mean log loss of a fitted binary logistic model on (x, y), negated: the cross-validation score.

    The same number as sklearn's ``neg_log_loss`` scorer, computed from the decision function directly:
    that scorer validates and one-hot encodes its inputs on every call, which took a quarter of a monitor
    job (7 strengths x 5 folds per probe, hundreds of probes per task)."""
    z = estimator.decision_function(x)
    return -float(np.mean(np.logaddexp(0.0, np.where(y == 1, -z, z))))


def logistic_probe(x: np.ndarray, y: np.ndarray, cv_folds: int = 5, seed: int = 0):
    """A fitted standardise + L2-logistic pipeline (strength by cross-validation when the data allow it)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = min(cv_folds, int(np.bincount(y, minlength=2).min()))
    if folds >= 2:
        clf = LogisticRegressionCV(Cs=PROBE_CS, l1_ratios=(0.0,), scoring=neg_log_loss, tol=1e-3, max_iter=500,
                                   cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                                   use_legacy_attributes=False)
    else:
        clf = LogisticRegression(C=1.0, tol=1e-3, max_iter=500)
    pipe = make_pipeline(StandardScaler(), clf)
    with warnings.catch_warnings():
        # weakly regularised candidates on separable data stop at max_iter; CV discards them
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe.fit(x, y)
    return pipe


class ZeroShot:
    name = "zero_shot"

    def fit(self, feats: Features, train_idx: np.ndarray) -> None:
        pass

    def score(self, feats: Features, idx: np.ndarray) -> np.ndarray:
        return feats.arrays["zero_shot"][idx].astype(np.float64)


class Probe:
    """A logistic probe on one feature array, optionally on the ``top_k`` columns with the largest difference of
    class means on the training split (columns are SAE latents, which share one scale, so raw differences compare)."""

    def __init__(self, name: str, feature: str, top_k: int | None = None, cv_folds: int = 5, seed: int = 0):
        self.name, self.feature, self.top_k, self.cv_folds, self.seed = name, feature, top_k, cv_folds, seed
        self.columns: np.ndarray | None = None
        self.model = None

    def _x(self, feats: Features, idx: np.ndarray) -> np.ndarray:
        if self.feature not in feats.arrays:
            raise MonitorConfigError(f"monitors.methods: {self.name} needs feature '{self.feature}', which was not "
                                     "computed (the SAE methods need an SAE)")
        x = feats.arrays[self.feature][idx]
        return x[:, self.columns] if self.columns is not None else x

    def fit(self, feats: Features, train_idx: np.ndarray) -> None:
        y = feats.labels[train_idx]
        self.columns = None
        if self.top_k is not None:
            x = feats.arrays[self.feature][train_idx]
            diff = np.abs(x[y == 1].mean(0) - x[y == 0].mean(0))
            # stable sort: ties (e.g. latents that never fire) resolve by index, the same on every run
            self.columns = np.sort(np.argsort(-diff, kind="stable")[:self.top_k])
        self.model = logistic_probe(self._x(feats, train_idx), y, self.cv_folds, self.seed)

    def score(self, feats: Features, idx: np.ndarray) -> np.ndarray:
        return self.model.decision_function(self._x(feats, idx))


class Stacked:
    """A probe's score and the zero-shot score combined by a 2-feature logistic fit on the training split.

    The probe's training-split scores that the combiner learns from are out-of-fold (cross-fitted) whenever each
    class has 2 training texts: in-sample scores of a probe look better than its test scores, and the combiner would
    trust the probe too much.
    """

    def __init__(self, probe: Probe, cv_folds: int = 5, seed: int = 0):
        self.probe, self.cv_folds, self.seed = probe, cv_folds, seed
        self.name = "stacked"
        self.model = None

    def _train_probe_scores(self, feats: Features, train_idx: np.ndarray) -> np.ndarray:
        from sklearn.model_selection import StratifiedKFold

        y = feats.labels[train_idx]
        folds = min(self.cv_folds, int(np.bincount(y, minlength=2).min()))
        if folds < 2:
            self.probe.fit(feats, train_idx)
            return self.probe.score(feats, train_idx)
        out = np.zeros(len(train_idx))
        for tr, te in StratifiedKFold(folds, shuffle=True, random_state=self.seed).split(train_idx, y):
            self.probe.fit(feats, train_idx[tr])
            out[te] = self.probe.score(feats, train_idx[te])
        return out

    def fit(self, feats: Features, train_idx: np.ndarray) -> None:
        s = self._train_probe_scores(feats, train_idx)
        self.probe.fit(feats, train_idx)
        x = np.column_stack([s, feats.arrays["zero_shot"][train_idx]])
        self.model = logistic_probe(x, feats.labels[train_idx], self.cv_folds, self.seed)

    def score(self, feats: Features, idx: np.ndarray) -> np.ndarray:
        x = np.column_stack([self.probe.score(feats, idx), feats.arrays["zero_shot"][idx]])
        return self.model.decision_function(x)


class PersonaLatent:
    def __init__(self, latent: int):
        self.name, self.latent = "persona_latent", latent

    def fit(self, feats: Features, train_idx: np.ndarray) -> None:
        pass

    def score(self, feats: Features, idx: np.ndarray) -> np.ndarray:
        if "sae_max" not in feats.arrays:
            raise MonitorConfigError("monitors.methods: persona_latent needs SAE features (no SAE was given)")
        d_sae = feats.arrays["sae_max"].shape[1]
        if not 0 <= self.latent < d_sae:
            raise MonitorConfigError(f"persona latent {self.latent} is not a latent of the SAE (d_sae={d_sae})")
        return feats.arrays["sae_max"][idx, self.latent].astype(np.float64)


def build_monitor(name: str, *, sae_top_k: int | None = None, stack_probe: str = "raw_mean",
                  persona_latent: int | None = None, cv_folds: int = 5, seed: int = 0) -> Monitor | None:
    """A fresh monitor by name; None when it does not apply (``persona_latent`` without a latent for the task,
    ``sae_topk`` without ``sae_top_k``)."""
    if name == "zero_shot":
        return ZeroShot()
    if name in PROBE_FEATURES:
        return Probe(name, PROBE_FEATURES[name], cv_folds=cv_folds, seed=seed)
    if name == "sae_topk":
        if sae_top_k is None:
            return None
        if sae_top_k < 1:
            raise MonitorConfigError(f"monitors.sae_top_k: must be >= 1, got {sae_top_k}")
        return Probe(name, "sae_max", top_k=sae_top_k, cv_folds=cv_folds, seed=seed)
    if name == "stacked":
        if stack_probe not in PROBE_FEATURES:
            raise MonitorConfigError(f"monitors.stack_probe: must be one of {sorted(PROBE_FEATURES)}, "
                                     f"got {stack_probe!r}")
        return Stacked(Probe(stack_probe, PROBE_FEATURES[stack_probe], cv_folds=cv_folds, seed=seed), cv_folds, seed)
    if name == "persona_latent":
        return None if persona_latent is None else PersonaLatent(int(persona_latent))
    raise MonitorConfigError(f"monitors.methods: unknown method {name!r}; known: {list(METHODS)}")
