"""Calibrated confidence: temperature scaling (Guo et al. 2017) and the expected calibration error.

A network's softmax is usually over-confident: of the images it calls with 95 %, far fewer than 95 %
are right. Temperature scaling divides every logit by one number T, fitted on the validation split
by minimising the negative log-likelihood; the predicted class never changes (argmax is unchanged),
only how sure the probabilities say it is. ECE sums, over 15 equal-width confidence bins, the gap
between accuracy and mean confidence, weighted by the share of images in the bin.

``fit_trust`` adds, on the same val outputs, the conformal thresholds and the novelty record (model.conformal,
model.novelty). Pure tensor code: nothing here reads a file or imports training code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vggft.model.conformal import fit_conformal
from vggft.model.inference import calibrated_softmax
from vggft.model.novelty import PASS_RATE, GaussianFit, mahalanobis_score, novelty_threshold
from vggft.model.weights import TrustRecord

ECE_BINS = 15
# The search range of T; a fit that ends on a bound means the val split is separable (T -> 0) or the
# logits carry no information (T -> infinity): the temperature is then not to be trusted.
LOG_T_RANGE = (math.log(1e-3), math.log(1e3))
_GOLDEN = (math.sqrt(5) - 1) / 2


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under softmax(logits / T)."""
    return float(F.cross_entropy(logits.double() / temperature, labels.long()))


@dataclass
class TemperatureFit:
    temperature: float
    nll_before: float
    nll_after: float
    count: int

    @property
    def at_bound(self) -> str | None:
        """Why the fit is not to be trusted (None: it is): T ran to an end of its search range."""
        low, high = (math.exp(b) for b in LOG_T_RANGE)
        if self.temperature <= low * 1.001:
            return "the model separates the val images perfectly, so the sharper the better (too few or too easy)"
        if self.temperature >= high / 1.001:
            return "the logits carry no information about the val labels (val accuracy at chance)"
        return None


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, tolerance: float = 1e-7) -> TemperatureFit:
    """The T that minimises the NLL of softmax(logits / T), by golden-section search over log T.

    The NLL is convex in 1/T, hence unimodal in log T: a 1-D search finds the minimum without a
    learning rate to tune, deterministically, in about 40 evaluations.
    """
    if len(labels) == 0:
        raise ValueError("no samples to fit a temperature on")
    logits, labels = logits.detach().double().cpu(), labels.detach().long().cpu()
    loss = lambda log_t: nll(logits, labels, math.exp(log_t))  # noqa: E731
    low, high = LOG_T_RANGE
    a, b = high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)
    fa, fb = loss(a), loss(b)
    while high - low > tolerance:
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - _GOLDEN * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + _GOLDEN * (high - low)
            fb = loss(b)
    best = min((low, high, a, b), key=loss)
    temperature = math.exp(best)
    return TemperatureFit(temperature, nll(logits, labels), nll(logits, labels, temperature), len(labels))


@dataclass
class Reliability:
    """Per confidence bin k, (k/bins, (k+1)/bins]: how many images, their accuracy and their mean confidence."""

    counts: list[int]
    accuracy: list[float]
    confidence: list[float]

    @property
    def ece(self) -> float:
        total = sum(self.counts)
        if not total:
            return 0.0
        return sum(
            n / total * abs(acc - conf)
            for n, acc, conf in zip(self.counts, self.accuracy, self.confidence, strict=True)
        )


def reliability(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> Reliability:
    """Bin the top-1 confidence into ``bins`` equal-width bins (lower, upper] over [0, 1]."""
    confidence, predicted = probabilities.detach().double().cpu().max(dim=1)
    correct = (predicted == labels.cpu()).double()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)  # (k/bins, (k+1)/bins] -> k
    counts = torch.bincount(index, minlength=bins)
    hits = torch.bincount(index, weights=correct, minlength=bins)
    sure = torch.bincount(index, weights=confidence, minlength=bins)
    safe = counts.clamp(min=1).double()
    return Reliability(counts.tolist(), (hits / safe).tolist(), (sure / safe).tolist())


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE = sum over bins of |B|/n * |accuracy(B) - mean confidence(B)|."""
    return reliability(probabilities, labels, bins).ece


def calibration_summary(logits: torch.Tensor, labels: torch.Tensor, temperature: float | None) -> dict:
    """ECE and NLL of the raw softmax and (when a temperature is known) of the calibrated one."""
    logits, labels = logits.float(), labels.long()
    raw = reliability(logits.softmax(dim=1), labels)
    summary = {
        "bins": ECE_BINS,
        "ece": raw.ece,
        "nll": nll(logits, labels),
        "temperature": temperature,
        "reliability": _bins_dict(raw),
    }
    if temperature is not None:
        scaled = reliability((logits / temperature).softmax(dim=1), labels)
        summary.update(
            ece_calibrated=scaled.ece,
            nll_calibrated=nll(logits, labels, temperature),
            reliability_calibrated=_bins_dict(scaled),
        )
    return summary


def _bins_dict(table: Reliability) -> dict:
    return {"counts": table.counts, "accuracy": table.accuracy, "confidence": table.confidence}


def fit_trust(
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], train: GaussianFit | None, temperature: float | None
) -> TrustRecord:
    """The conformal thresholds on the val (logits, labels) under the temperature, and the novelty record: the
    Mahalanobis statistics gathered over the train split's penultimate rows (``train``), its threshold on the
    val rows (without rows on either side: no novelty record)."""
    logits, labels, rows = val
    conformal = fit_conformal(calibrated_softmax(logits, temperature), labels)
    if train is None or rows is None or not train.count:
        return TrustRecord(conformal, None)
    stats = train.stats()
    threshold = novelty_threshold(mahalanobis_score(rows, stats))
    novelty = {
        "score": "mahalanobis",
        "dims": int(stats["projection"].shape[1]),
        "threshold": threshold,
        "pass_rate": PASS_RATE,
        "count": len(labels),
        "train_count": train.count,
    }
    return TrustRecord(conformal, novelty, stats)
