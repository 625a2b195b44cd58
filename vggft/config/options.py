"""The options commands take besides the config (counts, ranges, an option that needs another), each checked
in one place with one wording.

The library functions check their own arguments with these; the CLI calls the same checks first, before the
config is read or torch is imported, so a senseless value is one line (exit 2) in milliseconds and is named
before anything else that may be wrong. Like the rest of ``config``, this module imports no torch.
"""

from __future__ import annotations

from vggft.utils.errors import ConfigError, check_option


def check_eval(topk: int, misclassified: int, top_losses: int, explain: bool) -> None:
    check_option(topk >= 1, "--topk", "1 or more", topk)
    check_option(misclassified >= 0, "--misclassified", "0 (no grid) or more", misclassified)
    check_option(top_losses >= 0, "--top-losses", "0 (no grid) or more", top_losses)
    if explain and not (misclassified or top_losses):
        raise ConfigError(
            "--explain draws heatmaps on the --misclassified or --top-losses grid; add "
            "--misclassified N (or --top-losses N)"
        )


def check_predict(topk: int, batch_size: int) -> None:
    check_option(topk >= 1, "--topk", "1 or more", topk)
    check_batch_size(batch_size)


def check_batch_size(batch_size: int) -> None:
    check_option(batch_size >= 1, "--batch-size", "1 or more images", batch_size)


def check_summary(num_classes: int | None) -> None:
    check_option(num_classes is None or num_classes >= 1, "--num-classes", "1 or more", num_classes)


def check_show_batch(count: int | None) -> None:
    check_option(count is None or count >= 1, "--count", "1 or more images", count)


def check_max_imbalance(max_imbalance: float) -> None:
    check_option(
        max_imbalance > 1,
        "--max-imbalance",
        "a ratio greater than 1 (largest / smallest class), e.g. 10",
        max_imbalance,
    )


def check_similarity(similarity: float | None, near_duplicates: bool = True) -> None:
    """``--similarity``: a cosine similarity in (0, 1], and only with ``--near-duplicates``, whose threshold it is."""
    if similarity is None:
        return
    if not near_duplicates:
        raise ConfigError("--similarity: sets the threshold of --near-duplicates; add --near-duplicates")
    check_option(0 < similarity <= 1, "--similarity", "a cosine similarity above 0 and at most 1", f"{similarity:g}")


def check_lr_find(start: float, end: float, steps: int | None) -> None:
    """``steps`` None: one pass over the train rows (``--one-pass``)."""
    check_option(0 < start < end, "--start and --end", "0 < --start < --end", f"--start {start:g} --end {end:g}")
    check_option(
        steps is None or steps >= 10, "--steps", "10 or more (the first tenth and the last five are not used)", steps
    )


def check_folds(folds: int) -> None:
    check_option(folds >= 2, "--folds", "2 or more", folds)


def check_label_issues(folds: int, show: int) -> None:
    check_folds(folds)
    check_option(show >= 0, "--show", "0 (no grid) or more", show)


def check_demo(train_per_class: int, test_per_class: int) -> None:
    check_option(train_per_class >= 1, "--train-per-class", "1 or more images", train_per_class)
    check_option(test_per_class >= 1, "--test-per-class", "1 or more images", test_per_class)
