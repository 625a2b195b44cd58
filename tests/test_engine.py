"""The training loop (vggft/training/loop.py): heads fitted again and again on rows in memory, plain-argument
evaluation, the loop's options (optimizers, smoothing, clipping, bf16 on CPU, frozen BatchNorm), and errors
raised inside loader workers."""

from __future__ import annotations

import csv
import multiprocessing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from conftest import FAST, invoke, make_folder
from vggft.config.loading import load_config
from vggft.config.schema import Config, ModelConfig, TrainConfig
from vggft.data import prepare_data
from vggft.data.folders import output_names
from vggft.data.loaders import ImageList, make_loader
from vggft.data.transforms import eval_transform
from vggft.features.cache import FeatureSource
from vggft.model.build import build_model, set_train_mode, split_frozen_prefix
from vggft.training.loop import HeadOptions, evaluate, fit_head, fresh_head
from vggft.training.shared_steps import SharedSteps
from vggft.utils.errors import DataError


@pytest.fixture
def rows(pet):
    """Cached prefix rows of the pet folder, and the suffix that trains on them."""
    cfg = load_config(None, [f"data.root={pet}", "data.image_size=32", "data.resize=36", "model.weights=null"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 2, None)
    source = FeatureSource(model, cfg, torch.device("cpu"), None)
    splits, _ = prepare_data(cfg)
    train = (source.rows(splits["train"]), torch.tensor([label for _, label in splits["train"]]))
    test = (source.rows(splits["test"]), torch.tensor([label for _, label in splits["test"]]))
    return source.suffix, train, test


def test_fit_head_many_times_on_the_same_rows(rows, monkeypatch):
    suffix, train, test = rows
    calls = []
    real_forward = nn.Conv2d.forward
    monkeypatch.setattr(nn.Conv2d, "forward", lambda self, x: calls.append(1) or real_forward(self, x))
    cfg = TrainConfig(epochs=3, lr=0.05, momentum=0.9)
    names = ["cat", "dog"]
    fits = [fit_head(suffix, train, test, cfg, HeadOptions(names, 4, torch.device("cpu"), seed=s)) for s in (0, 0, 1)]
    assert calls == []  # no image, no backbone: only the head ran
    assert [len(f.history) for f in fits] == [3, 3, 3] and all("val_acc" in f.history[0] for f in fits)
    same = [
        torch.equal(a, b)
        for a, b in zip(fits[0].module.state_dict().values(), fits[1].module.state_dict().values(), strict=True)
    ]
    assert all(same)  # the same call gives the same head
    assert not torch.equal(fits[0].module[-1].weight, fits[2].module[-1].weight)  # another seed, another head
    assert not torch.equal(fits[0].module[-1].weight, suffix[-1].weight)  # the template is left alone
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    fit_head(suffix, train, None, cfg, HeadOptions(names, 4, torch.device("cpu")))
    assert torch.equal(torch.rand(2), expected)  # the caller's random state is untouched


def test_heads_that_share_training_steps_are_bit_identical_to_heads_fitted_alone(rows):
    """A sweep's trials share the frozen layers' output step by step (SharedSteps): each trial's head, history
    and the caller's random state are exactly what a fit on its own gives. Another seed or batch size meets
    other rows or another random state at every step, and computes."""
    suffix, train, test = rows
    cpu, names = torch.device("cpu"), ["cat", "dog"]
    configs = [
        TrainConfig(epochs=2, lr=lr, weight_decay=wd, momentum=0.9) for lr, wd in ((0.5, 0), (0.1, 1e-4), (0.5, 1e-4))
    ]
    alone = [fit_head(suffix, train, test, c, HeadOptions(names, 4, cpu)) for c in configs]
    steps = SharedSteps(suffix)
    torch.manual_seed(3)
    shared = [fit_head(suffix, train, test, c, HeadOptions(names, 4, cpu), steps=steps) for c in configs]
    assert torch.equal(torch.rand(2), torch.manual_seed(3) and torch.rand(2))
    assert steps.computed == 2 * 3 and steps.taken == 2 * steps.computed  # 12 rows in batches of 4, 2 epochs
    timeless = lambda fit: [{k: v for k, v in row.items() if k != "seconds"} for row in fit.history]  # noqa: E731
    for a, b in zip(alone, shared, strict=True):
        assert timeless(a) == timeless(b)
        assert all(
            torch.equal(x, y)
            for x, y in zip(a.module.state_dict().values(), b.module.state_dict().values(), strict=True)
        )
        assert list(a.module.state_dict()) == list(b.module.state_dict())
    for options in ({"seed": 1, "batch_size": 4}, {"batch_size": 3}):
        taken = steps.taken
        fit_head(suffix, train, test, configs[0], HeadOptions(names, device=cpu, **options), steps=steps)
        assert steps.taken == taken
    # The same rows under another random state are computed; under the same one, taken.
    layers, batch = list(fresh_head(suffix, 0).train())[:4], train[0][:4]  # dropout on
    cache = SharedSteps(suffix)
    torch.manual_seed(0)
    first = cache.run(0, batch, layers)
    torch.manual_seed(1)
    other = cache.run(0, batch, layers)
    torch.manual_seed(0)
    again = cache.run(0, batch, layers)
    assert (cache.computed, cache.taken) == (2, 1) and torch.equal(first, again) and not torch.equal(first, other)


def test_evaluate_takes_plain_arguments(rows):
    suffix, _, (test_rows, test_labels) = rows
    loader = make_loader(torch.utils.data.TensorDataset(test_rows, test_labels), 3, device=torch.device("cpu"))
    metrics = evaluate(suffix, loader, torch.device("cpu"), None, names=output_names(["cat", "dog"], 2), ks=(1,))
    assert metrics.total == 7 and int(metrics.confusion.sum(dim=1)[0]) == 3


def test_a_file_spoilt_after_the_check_is_one_line_even_from_a_worker(tmp_path):
    """With loader workers (the default on CUDA) torch re-raises a worker's error with its whole traceback as
    the message; vggft's errors keep their one line. EOFError and decompression bombs are decode errors too."""
    good = tmp_path / "good.jpg"
    Image.new("RGB", (40, 32), (200, 60, 40)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:60])
    images = ImageList([(str(good), 0), (str(truncated), 0)], eval_transform(Config().data))
    loader = make_loader(images, 1, device=torch.device("cpu"), num_workers=1)
    with pytest.raises(DataError) as caught:
        list(loader)
    message = str(caught.value)
    # The worker has stopped already: left to a later garbage collection (the traceback keeps the loader's
    # iterator alive), torch's shutdown found the worker's queue closed and waited 5 s for it.
    assert not multiprocessing.active_children()
    assert "\n" not in message and message.startswith(f"{truncated}: cannot be read any more")
    assert "run vggft check-data" in message


@pytest.fixture
def used(monkeypatch):
    """What training really ran with, recorded as it ran: the type of each optimizer that stepped, the label
    smoothing of each cross-entropy computed, the max_norm of each gradient clipping, the dtype each Linear
    layer computed in."""
    seen = SimpleNamespace(optimizers=set(), smoothing=set(), clips=set(), dtypes=set())
    cross_entropy, clip, linear = nn.CrossEntropyLoss.forward, torch.nn.utils.clip_grad_norm_, nn.Linear.forward

    def clipping(parameters, max_norm, *args, **kwargs):
        seen.clips.add(max_norm)
        return clip(parameters, max_norm, *args, **kwargs)

    def computing(self, x):
        out = linear(self, x)
        seen.dtypes.add(out.dtype)
        return out

    monkeypatch.setattr(
        nn.CrossEntropyLoss,
        "forward",
        lambda self, *args: seen.smoothing.add(self.label_smoothing) or cross_entropy(self, *args),
    )
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clipping)
    monkeypatch.setattr(nn.Linear, "forward", computing)
    stepped = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: seen.optimizers.add(type(optimizer)))
    yield seen
    stepped.remove()


ADAM_STATE, MOMENTUM_STATE = {"exp_avg", "exp_avg_sq"}, {"momentum_buffer"}


@pytest.mark.parametrize(
    ("options", "optimizer", "state", "group", "smoothing", "clip", "bf16"),
    [
        (
            ["train.optimizer=adam", "train.weight_decay=0.01"],
            torch.optim.Adam,
            ADAM_STATE,
            {"weight_decay": 0.01},
            0.0,
            None,
            False,
        ),
        (
            ["train.optimizer=adamw", "train.weight_decay=0.05", "train.label_smoothing=0.1"],
            torch.optim.AdamW,
            ADAM_STATE,
            {"weight_decay": 0.05},
            0.1,
            None,
            False,
        ),
        (
            ["train.optimizer=sgd", "train.momentum=0.9", "train.nesterov=true", "train.grad_clip=0.5"],
            torch.optim.SGD,
            MOMENTUM_STATE,
            {"momentum": 0.9, "nesterov": True},
            0.0,
            0.5,
            False,
        ),
        (["train.amp=bf16"], torch.optim.SGD, set(), {"momentum": 0.0}, 0.0, None, True),  # autocast on CPU
    ],
)
def test_loop_options_are_used_and_recorded(runner, pet, used, options, optimizer, state, group, smoothing, clip, bf16):
    """Each option is checked where it acts: the optimizer that stepped and the state it saved in last.pt
    (Adam keeps moment estimates, SGD with momentum a momentum buffer, SGD without none), the loss's label
    smoothing (evaluation's loss has none), the clipping, the dtype the head computed in; and config.yaml
    records them."""
    args = [a for option in options for a in ("--set", option)]
    result = invoke(runner, "train", "--set", f"data.root={pet}", *FAST, *args)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open("runs/train/metrics.csv")))
    assert len(rows) == 2 and all(0 <= float(r["train_loss"]) < 10 for r in rows)
    assert used.optimizers == {optimizer}  # the exact type: AdamW is a subclass of Adam in newer torch
    saved = torch.load("runs/train/last.pt", weights_only=True)["optimizer"]
    assert saved["state"] or not state  # every trained parameter has its state when the optimizer keeps one
    assert all(set(kept) - {"step"} == state for kept in saved["state"].values()), saved["state"]
    assert all(g[key] == value for g in saved["param_groups"] for key, value in group.items()), saved["param_groups"]
    assert used.smoothing == {0.0, smoothing}
    assert used.clips == ({clip} if clip else set())
    assert (torch.bfloat16 in used.dtypes) is bf16 and torch.float64 not in used.dtypes
    config = load_config(Path("runs/train/config.yaml"))
    for option in options:
        key, value = option.split("=")
        section, name = key.split(".")
        assert str(getattr(getattr(config, section), name)).lower() == value.lower()


def test_label_smoothing_and_clipping_change_the_result(rows):
    suffix, train, _ = rows
    base = TrainConfig(epochs=1, lr=0.5)
    heads = [
        fit_head(suffix, train, None, cfg, HeadOptions(["cat", "dog"], 4, torch.device("cpu"))).module
        for cfg in (
            base,
            TrainConfig(epochs=1, lr=0.5, label_smoothing=0.2),
            TrainConfig(epochs=1, lr=0.5, grad_clip=1e-3),
        )
    ]
    assert not torch.equal(heads[0][-1].weight, heads[1][-1].weight)
    assert not torch.equal(heads[0][-1].weight, heads[2][-1].weight)
    start = fresh_head(suffix, base.seed)[-1].weight  # every fit starts from the seed's init
    clipped, free = ((h[-1].weight - start).norm() for h in (heads[2], heads[0]))
    assert clipped < free


def test_batchnorm_arch_keeps_frozen_statistics(runner, pet):
    """vgg16_bn with block5 thawed: the frozen blocks' BatchNorm stays in eval mode (running stats unchanged)."""
    model = build_model(ModelConfig(arch="vgg16_bn", weights=None, unfreeze=["block5"]), 2, None)
    prefix, suffix, _ = split_frozen_prefix(model)
    set_train_mode(nn.Sequential(prefix, suffix))
    frozen_bn = [m for m in model.features[:34] if isinstance(m, nn.BatchNorm2d)]
    thawed_bn = [m for m in model.features[34:] if isinstance(m, nn.BatchNorm2d)]
    assert frozen_bn and all(not m.training for m in frozen_bn) and all(m.training for m in thawed_bn)
    result = invoke(
        runner,
        "train",
        "--set",
        f"data.root={pet}",
        *FAST,
        "--set",
        "model.arch=vgg16_bn",
        "--set",
        "model.weights=null",
        "--set",
        "model.unfreeze=[block5]",
    )
    assert result.exit_code == 0, result.output
    saved = torch.load("models/VGG16.pt", weights_only=True)
    torch.manual_seed(0)
    fresh = build_model(ModelConfig(arch="vgg16_bn", weights=None), 2, None).state_dict()
    # Random init is seeded by train.seed (0): block1's BatchNorm statistics are exactly the fresh ones.
    assert torch.equal(saved["features.1.running_mean"], fresh["features.1.running_mean"])
    assert not torch.equal(saved["features.41.running_mean"], fresh["features.41.running_mean"])


def test_val_fraction_and_eval_on_the_val_split(runner, tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"cat": 10, "dog": 10}, "test": {"cat": 2, "dog": 2}})
    result = invoke(runner, "train", "--set", f"data.root={root}", *FAST, "--set", "data.val_fraction=0.2")
    assert result.exit_code == 0, result.output
    assert "train 16, val 4, test 4 images" in result.stderr
    assert all(r["val_acc"] for r in csv.DictReader(open("runs/train/metrics.csv")))
    result = invoke(runner, "eval", "--split", "val", "-q")
    assert result.exit_code == 0 and result.stdout.splitlines()[0].endswith("/4)")
    result = invoke(runner, "eval", "--split", "train", "-q")
    assert result.exit_code == 0 and result.stdout.splitlines()[0].endswith("/16)")


def test_balance_weights_and_sampler_even_out_the_classes(pet):
    """8 cats and 2 dogs: the weighted loss gives each dog 4x a cat's weight; the sampler draws both about equally."""
    from vggft.training.loop import class_weights
    from vggft.training.train import _make_loop

    labels = torch.tensor([0] * 8 + [1] * 2)
    assert class_weights(labels, 3).tolist() == [0.625, 2.5, 0.0]  # an absent class weighs nothing
    root = make_folder(pet.parent / "skewed", {"train": {"cat": 16, "dog": 4}, "test": {"cat": 1, "dog": 1}})
    cfg = load_config(
        None,
        [f"data.root={root}", "data.image_size=32", "data.resize=36", "data.balance=sampler", "data.batch_size=20"],
    )
    model = build_model(cfg.model, 2, None)
    splits, _ = prepare_data(cfg)
    source = FeatureSource(model, cfg, torch.device("cpu"), None)
    from vggft.utils.distributed import SINGLE

    loop, _, _ = _make_loop(cfg, model, source, splits, torch.device("cpu"), None, SINGLE)
    drawn = torch.cat([labels for _ in range(20) for _, labels in loop.train_loader])
    assert len(drawn) == 400 and 0.4 < drawn.float().mean() < 0.6  # dogs are 20% of the data, ~50% of the draws
