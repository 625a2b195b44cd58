"""Conformal prediction sets (split conformal: Vovk et al. 2005; Angelopoulos & Bates 2021).

From n held-out calibration images (the val split) with their true labels, each gets a nonconformity score
s_i (how badly the model's probabilities fit its label). For a new image the set of classes whose score is at
most q, the ceil((n+1)(1-alpha))-th smallest s_i, holds the true class with probability >= 1 - alpha (over the
draw of calibration and test images, exchangeable; marginal: averaged over images, not per class or per image),
whatever the model. Two scores:

- ``lac`` (Sadinle et al. 2019, "threshold"): s = 1 - p_y. The smallest sets on average; a set may be empty when
  no class is likely enough.
- ``aps`` (Romano et al. 2020; non-randomised): s = the sum of the probabilities of the classes at least as
  probable as y. Sets grow with the model's doubt; the most probable class is always in (which only adds
  coverage).

The sidecar keeps q for every coverage level in ``COVERAGE_LEVELS`` (None: ceil((n+1)(1-alpha)) > n, too few
calibration images for that level, so the set is every class). Pure tensor code: nothing here reads a file.
"""

from __future__ import annotations

import math

import torch

METHODS = ("lac", "aps")
DEFAULT_METHOD = "lac"  # smaller sets than aps on digits (docs/performance.md), the same sets as MAPIE's
# The coverages a user may ask for: 0.50, 0.51, ..., 0.99.
COVERAGE_LEVELS = tuple(round(0.5 + 0.01 * i, 2) for i in range(50))
# The levels an exported file's metadata lists.
EXPORTED_LEVELS = (0.8, 0.9, 0.95, 0.99)


def level_key(coverage: float) -> str:
    """'0.90' for 0.9: the sidecar's key of a coverage level."""
    return f"{coverage:.2f}"


def class_scores(probabilities: torch.Tensor, method: str) -> torch.Tensor:
    """The (images, classes) nonconformity score of every class for every image: lower fits better."""
    probs = probabilities.detach().double().cpu()
    if method == "lac":
        return 1.0 - probs
    if method == "aps":
        order = probs.argsort(dim=1, descending=True, stable=True)
        cumulative = probs.gather(1, order).cumsum(dim=1)
        return torch.empty_like(probs).scatter_(1, order, cumulative)
    raise ValueError(f"unknown conformal score {method!r}; expected one of {', '.join(METHODS)}")


def label_scores(probabilities: torch.Tensor, labels: torch.Tensor, method: str) -> torch.Tensor:
    """Each image's nonconformity score of its true class."""
    return class_scores(probabilities, method).gather(1, labels.long().cpu().view(-1, 1)).view(-1)


def conformal_quantile(scores: torch.Tensor, coverage: float) -> float | None:
    """The ceil((n+1) * coverage)-th smallest score (the finite-sample split-conformal quantile); None when that
    rank exceeds n (too few calibration scores: only the set of every class covers)."""
    n = len(scores)
    rank = math.ceil((n + 1) * coverage - 1e-9)  # 1e-9: (n+1)*0.9 computed as 90.00000000000001 is rank 90
    if n == 0 or rank > n:
        return None
    return float(scores.double().sort().values[rank - 1])


def fit_conformal(probabilities: torch.Tensor, labels: torch.Tensor, method: str = DEFAULT_METHOD) -> dict:
    """The sidecar's ``conformal`` record: the score, the calibration count and q per coverage level."""
    scores = label_scores(probabilities, labels, method)
    thresholds = {level_key(c): conformal_quantile(scores, c) for c in COVERAGE_LEVELS}
    return {"method": method, "count": len(scores), "thresholds": thresholds}


def prediction_sets(probabilities: torch.Tensor, threshold: float | None, method: str) -> list[list[int]]:
    """Per image, the classes whose score is at most ``threshold`` (None: every class), most probable first."""
    probs = probabilities.detach().double().cpu()
    order = probs.argsort(dim=1, descending=True, stable=True)
    if threshold is None:
        return order.tolist()
    inside = class_scores(probs, method) <= threshold + 1e-12  # the same score computed twice may differ in ulp
    if method == "aps":
        inside.scatter_(1, order[:, :1], True)
    return [[c for c in row if keep[c]] for row, keep in zip(order.tolist(), inside.tolist(), strict=True)]


def set_coverage(sets: list[list[int]], labels: torch.Tensor, names: list[str]) -> dict:
    """Empirical coverage (share of images whose set holds their label) and mean set size, overall and per
    true class (classes with no image are left out)."""
    truth = labels.long().tolist()
    hits = [label in chosen for chosen, label in zip(sets, truth, strict=True)]
    sizes = [len(chosen) for chosen in sets]
    per_class = []
    for index, name in enumerate(names):
        mine = [i for i, label in enumerate(truth) if label == index]
        if mine:
            per_class.append(
                {
                    "class": name,
                    "images": len(mine),
                    "coverage": sum(hits[i] for i in mine) / len(mine),
                    "mean_size": sum(sizes[i] for i in mine) / len(mine),
                }
            )
    count = max(len(sets), 1)
    return {
        "coverage": sum(hits) / count,
        "mean_size": sum(sizes) / count,
        "empty": sum(1 for s in sizes if s == 0),
        "images": len(sets),
        "per_class": per_class,
    }


def check_coverage(coverage: float | None) -> None:
    """None, or one of COVERAGE_LEVELS (0.50 to 0.99 in steps of 0.01): the levels a sidecar holds."""
    from vggft.utils.errors import ConfigError

    if coverage is not None and not any(abs(coverage - c) < 1e-9 for c in COVERAGE_LEVELS):
        raise ConfigError(f"--coverage: {coverage!r} is not one of 0.50, 0.51, ..., 0.99 (the levels calibrated)")
