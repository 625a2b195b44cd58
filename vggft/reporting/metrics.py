"""Classification metrics from a confusion matrix: every image counted exactly once."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vggft.data.folders import output_names

TABLE_WIDTH = 100  # a text confusion matrix wider than this is indexed (columns 0..n-1) with a legend
LEGEND_NAME = 24  # row labels of an indexed table: the index and the name shortened to this


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in '...' when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Metrics:
    class_names: list[str]
    confusion: torch.Tensor  # [true, predicted] counts, int64
    loss_sum: float = 0.0
    topk_correct: dict[int, int] = field(default_factory=dict)
    logits: list[torch.Tensor] = field(default_factory=list)  # per batch (float32, CPU), when kept
    labels: list[torch.Tensor] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # sections a caller adds to to_dict (eval: calibration, ...)

    @classmethod
    def empty(cls, class_names: list[str], num_outputs: int | None = None) -> Metrics:
        n = max(len(class_names), num_outputs or 0)
        return cls(output_names(class_names, n), torch.zeros(n, n, dtype=torch.int64))

    def update(
        self, logits: torch.Tensor, labels: torch.Tensor, loss_sum: float = 0.0, ks=(1, 5), keep: bool = False
    ) -> None:
        logits, labels = logits.detach().float().cpu(), labels.cpu()
        if keep:
            self.logits.append(logits)
            self.labels.append(labels)
        predicted = logits.argmax(dim=1)
        n = self.confusion.shape[0]
        self.confusion += torch.bincount(labels * n + predicted, minlength=n * n).view(n, n)
        self.loss_sum += loss_sum
        for k in ks:
            k = min(k, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            self.topk_correct[k] = self.topk_correct.get(k, 0) + int((top == labels[:, None]).any(dim=1).sum())

    @property
    def probabilities(self) -> list[torch.Tensor]:
        """Softmax of the kept logits, per batch."""
        return [batch.softmax(dim=1) for batch in self.logits]

    def sample_losses(self) -> torch.Tensor:
        """Cross-entropy of every kept sample, in loader order (needs keep=True)."""
        if not self.logits:
            return torch.empty(0)
        return torch.nn.functional.cross_entropy(torch.cat(self.logits), torch.cat(self.labels), reduction="none")

    def top_losses(self, count: int) -> list[tuple[int, int, int, float, float]]:
        """(index, true, predicted, probability of the prediction, loss) of the ``count`` highest-loss samples,
        right or wrong (needs keep=True)."""
        if not self.logits or count <= 0:
            return []
        losses = self.sample_losses()
        confidence, predicted = torch.cat(self.probabilities).max(dim=1)
        labels = torch.cat(self.labels)
        order = losses.argsort(descending=True, stable=True)[:count]
        return [(int(i), int(labels[i]), int(predicted[i]), float(confidence[i]), float(losses[i])) for i in order]

    def confused_pairs(self, limit: int | None = None) -> list[dict]:
        """Off-diagonal cells of the confusion matrix, most frequent first: {"true", "predicted", "count"}."""
        off = self.confusion.clone().fill_diagonal_(0)
        cells = [(int(off[t, p]), int(t), int(p)) for t, p in off.nonzero().tolist()]  # only the non-zero cells
        cells.sort(key=lambda cell: (-cell[0], cell[1], cell[2]))
        return [
            {"true": self.class_names[t], "predicted": self.class_names[p], "count": c} for c, t, p in cells[:limit]
        ]

    @property
    def total(self) -> int:
        return int(self.confusion.sum())

    @property
    def correct(self) -> int:
        return int(self.confusion.diag().sum())

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.total if self.total else 0.0

    def per_class(self) -> list[dict]:
        """support, correct, accuracy (= recall), precision and F1 per class.

        The precision of a class the model never predicted is undefined: None (n/a), not 0.
        """
        rows = []
        for i, name in enumerate(self.class_names):
            support = int(self.confusion[i].sum())
            predicted = int(self.confusion[:, i].sum())
            hit = int(self.confusion[i, i])
            recall = hit / support if support else 0.0
            precision = hit / predicted if predicted else None
            f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
            rows.append(
                {
                    "class": name,
                    "support": support,
                    "correct": hit,
                    "accuracy": recall,
                    "precision": precision,
                    "recall": recall,
                    "f1": f1,
                }
            )
        return rows

    def worst_mistakes(self, count: int) -> list[tuple[int, int, int, float]]:
        """(index, true, predicted, confidence) of the most confident wrong predictions (needs keep=True)."""
        if not self.logits or count <= 0:  # before the softmax of every kept logit
            return []
        probs, labels = torch.cat(self.probabilities), torch.cat(self.labels)
        confidence, predicted = probs.max(dim=1)
        wrong = (predicted != labels).nonzero().flatten()
        order = wrong[confidence[wrong].argsort(descending=True)][:count]
        return [(int(i), int(labels[i]), int(predicted[i]), float(confidence[i])) for i in order]

    def confusion_table(self, max_width: int = TABLE_WIDTH) -> str:
        """Rows: true class, columns: predicted. Columns are headed by class name while the table fits in
        ``max_width`` characters; past that (long names, many classes) by index, with a legend below."""
        names = self.class_names
        corner = "true \\ predicted"
        counts = [[str(int(v)) for v in row[: len(names)]] for row in self.confusion[: len(names)]]
        number = max(len(c) for row in counts for c in row)
        label = max(len(corner), *(len(n) for n in names)) + 2
        width = max(number, *(len(n) for n in names)) + 2
        if label + width * len(names) <= max_width:
            lines = [corner.ljust(label) + "".join(n.rjust(width) for n in names)]
            lines += [
                name.ljust(label) + "".join(c.rjust(width) for c in row)
                for name, row in zip(names, counts, strict=False)
            ]
            return "\n".join(lines)
        digits = len(str(len(names) - 1))
        tag = [f"{i:>{digits}} {shorten(name, LEGEND_NAME)}" for i, name in enumerate(names)]
        label = max(len(corner), *(len(t) for t in tag)) + 2
        width = max(number, digits) + 2
        lines = [corner.ljust(label) + "".join(str(i).rjust(width) for i in range(len(names)))]
        lines += [t.ljust(label) + "".join(c.rjust(width) for c in row) for t, row in zip(tag, counts, strict=False)]
        lines.append("Classes:")
        lines += [f"  {i:>{digits}}  {name}" for i, name in enumerate(names)]
        return "\n".join(lines)

    def summary_line(self) -> str:
        return f"acc@1 {100 * self.accuracy:.2f}% ({self.correct}/{self.total})"

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "correct": self.correct,
            "total": self.total,
            "loss": self.loss,
            "topk": {f"acc@{k}": c / self.total if self.total else 0.0 for k, c in sorted(self.topk_correct.items())},
            "per_class": self.per_class(),
            "confusion": self.confusion.tolist(),
            "confused_pairs": self.confused_pairs(),
            **self.extra,
        }
