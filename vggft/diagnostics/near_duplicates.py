"""``vggft check-data --near-duplicates``: resized, recompressed or slightly cropped copies of an image.

Byte equality (the exact duplicates check-data always reports) misses a copy saved at another size
or JPEG quality. Here every readable image becomes the 512-d global-average-pooled output of the
configured backbone's ``features`` (the frozen prefix of a ``gap`` head, so the rows live in the
feature cache beside a gap-head training run's, and a second check extracts nothing); pairs whose
cosine similarity reaches the threshold are joined into groups (union-find). A group spanning two
splits is test leakage. The similarity matrix is computed a block of rows at a time, so memory stays
bounded (about ``BLOCK_ELEMENTS`` floats) for tens of thousands of images.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from vggft.config.options import check_similarity
from vggft.config.schema import Config
from vggft.data.check import DataReport, NearGroup
from vggft.features.cache import FeatureSource
from vggft.model.build import build_model
from vggft.model.pretrained import pretrained_state_dict
from vggft.utils.device import autocast_dtype, prepare_backend, resolve_device
from vggft.utils.errors import ConfigError
from vggft.utils.logs import log

DEFAULT_SIMILARITY = 0.97
BLOCK_ELEMENTS = 1 << 24  # similarities held at once: 64 MiB of float32
MAX_PAIRS = 2_000_000  # beyond this the threshold links nearly everything: refuse instead of running out of memory


def pooled_features(cfg: Config, paths: list[str]) -> torch.Tensor:
    """(len(paths), 512): the backbone's globally average-pooled ``features`` output, from the feature cache."""
    gap = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, head="gap", unfreeze=0, num_classes=None),
        data=dataclasses.replace(cfg.data, augment="none"),
    )
    device = resolve_device(cfg.train.device)
    prepare_backend(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # a random-init backbone (model.weights: null) is the training run's
        model = build_model(gap.model, 2, pretrained_state_dict(gap.model))
    # cache: off keeps the rows in memory for this check only
    source = FeatureSource(model, gap, device, autocast_dtype(device, cfg.train.amp), rows_in_memory=True)
    if source.cut != "flatten":
        raise AssertionError(f"the gap head's frozen prefix ends at {source.cut}, not at the pooled features")
    return source.rows([(path, 0) for path in paths], desc="near-duplicate").tensor()  # one matrix: all pairs


def similar_pairs(rows: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (i < j) with cosine similarity >= ``threshold``: an (M, 2) index tensor and the M similarities."""
    unit = F.normalize(rows.float(), dim=1)
    n = len(unit)
    block = max(1, BLOCK_ELEMENTS // max(n, 1))
    pairs, sims, found = [], [], 0
    for start in range(0, n, block):
        chunk = unit[start : start + block] @ unit[start:].T  # rows start.., columns start..: the upper triangle
        i, j = (chunk >= threshold).nonzero(as_tuple=True)
        upper = j > i
        i, j = i[upper], j[upper]
        found += len(i)
        if found > MAX_PAIRS:
            raise ConfigError(
                f"--similarity {threshold:g}: more than {MAX_PAIRS:,} pairs of images are that "
                f"similar, so the groups would say nothing; raise it (default {DEFAULT_SIMILARITY})"
            )
        pairs.append(torch.stack([i + start, j + start], dim=1))
        sims.append(chunk[i, j])
    if not pairs:
        return torch.empty(0, 2, dtype=torch.long), torch.empty(0)
    return torch.cat(pairs), torch.cat(sims)


def group_pairs(n: int, pairs: torch.Tensor, sims: torch.Tensor) -> list[tuple[list[int], float]]:
    """Connected components of the pairs (union-find), each with the lowest similarity that links it."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs.tolist():
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    lowest: dict[int, float] = {}
    for (i, _), sim in zip(pairs.tolist(), sims.tolist(), strict=True):
        root = find(i)
        lowest[root] = min(lowest.get(root, 1.0), sim)
    members: dict[int, list[int]] = {}
    for index in range(n):
        root = find(index)
        if root in lowest:
            members.setdefault(root, []).append(index)
    return [(members[root], lowest[root]) for root in sorted(members)]


def find_near_duplicates(cfg: Config, report: DataReport, similarity: float = DEFAULT_SIMILARITY) -> DataReport:
    """Fill ``report.near_cross`` and ``report.near_within`` with groups of near-identical readable images.

    Groups made only of byte-identical files are left out: the exact-duplicate check reports them.
    """
    check_similarity(similarity)
    members = [(split, path) for split, (path, _) in report.splits.all_samples() if report.verdicts[path].ok]
    report.near_threshold, report.near_checked = similarity, len(members)
    if len(members) < 2:
        return report
    if cfg.model.weights is None:
        log.warning(
            "Near-duplicates: model.weights is null, so the features come from a random backbone and mostly "
            "compare colours; pretrained weights (model.weights: IMAGENET1K_V1) compare content"
        )
    rows = pooled_features(cfg, [path for _, path in members])
    pairs, sims = similar_pairs(rows, similarity)
    groups = group_pairs(len(members), pairs, sims)
    largest = max((len(indices) for indices, _ in groups), default=0)
    if largest >= 6 and largest > len(members) // 2:
        log.warning(
            f"Near-duplicates: one group holds {largest} of the {len(members)} images: at cosine "
            f"{similarity:g} these features do not tell the pictures apart; raise --similarity"
        )
    for indices, lowest in groups:
        group = [members[i] for i in indices]
        if len({report.verdicts[path].sha1 for _, path in group}) == 1:
            continue
        target = report.near_cross if len({split for split, _ in group}) > 1 else report.near_within
        target.append(NearGroup(group, lowest))
    return report
