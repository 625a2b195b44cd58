"""sweep, lr-find, kfold and label-issues: many heads on one extraction of the feature cache."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from conftest import CLASS_COLOURS, assert_one_line_error, invoke, make_folder, make_image
from tiny import tiny_vgg
from vggft.config.loading import load_config
from vggft.tuning.kfold import stratified_folds
from vggft.tuning.label_issues import find_label_issues, too_weak
from vggft.tuning.lr_find import BETA, RangeTest, advice, steepest, suggest, valley

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Three colour classes (train, val, test) and a tiny VGG whose random convs keep the signal (He init, as
    torchvision's own): a head tells the classes apart within a few epochs. One cache for the module."""
    root = tmp_path_factory.mktemp("tune")
    data = make_folder(
        root / "colours",
        {
            "train": {"cat": 10, "dog": 10, "owl": 10},
            "val": {"cat": 3, "dog": 3, "owl": 3},
            "test": {"cat": 2, "dog": 2, "owl": 2},
        },
    )
    torch.manual_seed(0)
    model = tiny_vgg("vgg16")
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    torch.save(model.state_dict(), root / "he.pth")
    return SimpleNamespace(root=root, data=data, cache=root / "cache", weights=root / "he.pth")


def options(env, *extra: str, data: Path | None = None, cache: bool = True) -> list[str]:
    sets = [
        f"data.root={data or env.data}",
        f"model.weights={env.weights}",
        "data.image_size=32",
        "data.resize=36",
        "model.head=gap",
        "train.optimizer=adam",
        "train.lr=0.05",
        "train.epochs=6",
        "data.batch_size=8",
        *([f"cache.dir={env.cache}"] if cache else []),
        *extra,
    ]
    return [a for s in sets for a in ("--set", s)] + ["--quiet"]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def conv_counter(monkeypatch) -> list:
    calls = []
    real = nn.Conv2d.forward
    monkeypatch.setattr(nn.Conv2d, "forward", lambda self, x: calls.append(1) or real(self, x))
    return calls


# --- sweep -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["gap", "classifier6"])
def test_sweep_grid_ranks_on_val_and_writes_a_run_folder_whose_best_yaml_trains(runner, env, head):
    verbose = ["--verbose"] if head == "classifier6" else []
    result = invoke(
        runner,
        *verbose,
        "sweep",
        *options(env, f"model.head={head}"),
        "--grid",
        "train.lr=1e-5,0.05",
        "--grid",
        "train.weight_decay=0,1e-4",
        "--name",
        f"grid-{head}",
    )
    assert result.exit_code == 0, result.output
    # how the trials shared the frozen layers' work: a detail for --verbose alone
    assert ("frozen layers ran" in result.stderr) == bool(verbose)
    folder = Path(f"runs/grid-{head}")
    assert {p.name for p in folder.iterdir()} == {
        "results.csv",
        "best.yaml",
        "sweep.png",
        "config.yaml",
        "results.json",
    }
    assert (folder / "sweep.png").read_bytes().startswith(PNG)
    rows = read_csv(folder / "results.csv")
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    assert sorted((float(r["train.lr"]), float(r["train.weight_decay"])) for r in rows) == [
        (1e-5, 0.0),
        (1e-5, 1e-4),
        (0.05, 0.0),
        (0.05, 1e-4),
    ]
    accs = [float(r["val_acc"]) for r in rows]
    assert accs == sorted(accs, reverse=True) and accs[0] > 0.9 and float(rows[0]["train.lr"]) == 0.05
    assert all(r["status"] == "ok" and 1 <= int(r["epoch"]) <= 6 and float(r["seconds"]) > 0 for r in rows)
    # stdout: the ranked table, best first, then where things went
    table = result.stdout.splitlines()
    assert table[0].split()[:4] == ["rank", "trial", "train.lr", "train.weight_decay"]
    assert table[1].split()[:2] == ["1", rows[0]["trial"]]
    assert f"Train it: vggft train --config {folder / 'best.yaml'}" in result.stdout
    assert "Trial 1/" not in result.stderr and "Trial" not in result.stdout  # each trial said once: in the table
    # best.yaml is the winner's whole config, and trains as it is
    best = load_config(folder / "best.yaml")
    assert best.train.lr == 0.05 and best.train.weight_decay == float(rows[0]["train.weight_decay"])
    assert best.model.head == head and best.data.root == str(env.data) and best.output.name is None
    if head == "gap":
        trained = invoke(runner, "train", "--config", folder / "best.yaml", "--quiet")
        assert trained.exit_code == 0, trained.output
        assert trained.stdout.startswith("Test: acc@1")


def test_save_best_saves_the_winning_head_without_training_it_again(runner, env):
    result = invoke(
        runner, "sweep", *options(env, "output.weights=models/best.pt"), "--grid", "train.lr=1e-5,0.05", "--save-best"
    )
    assert result.exit_code == 0, result.output
    assert "Saved models/best.pt (sidecar models/best.json)" in result.stdout
    best = read_csv(Path("runs/sweep/results.csv"))[0]
    # the saved model scores on val exactly what the winning trial scored there
    scored = invoke(runner, "eval", "--weights", "models/best.pt", "--split", "val", "--json", "--quiet")
    assert scored.exit_code == 0, scored.output
    total, correct = 9, round(float(best["val_acc"]) * 9)
    assert f'"correct": {correct}' in scored.stdout and f'"total": {total}' in scored.stdout


def test_random_search_is_seeded_and_stays_in_its_ranges(runner, env):
    def values(seed: int) -> list[tuple[float, int]]:
        result = invoke(
            runner,
            "sweep",
            *options(env),
            "--trials",
            "3",
            "--range",
            "train.lr=1e-4:1e-1:log",
            "--range",
            "train.epochs=1:3",
            "--seed",
            str(seed),
        )
        assert result.exit_code == 0, result.output
        folder = Path(result.stdout.split("Wrote ")[1].split("/:")[0])
        rows = sorted(read_csv(folder / "results.csv"), key=lambda r: int(r["trial"]))
        return [(float(r["train.lr"]), int(r["train.epochs"])) for r in rows]

    first = values(7)
    assert values(7) == first and values(8) != first
    assert all(1e-4 <= lr <= 1e-1 and 1 <= epochs <= 3 for lr, epochs in first)


@pytest.mark.parametrize(
    ("args", "names", "fix"),
    [
        (["--grid", "model.arch=vgg11,vgg13"], ["--grid model.arch", "cached rows"], "once per model.arch value"),
        (
            ["--grid", "data.image_size=32,64"],
            ["--grid data.image_size", "cached rows"],
            "once per data.image_size value",
        ),
        (["--grid", "model.unfreeze=0,1"], ["--grid model.unfreeze", "cached rows"], "once per model.unfreeze value"),
        (["--grid", "data.augment=none,light"], ["--grid data.augment", "cached rows"], "once per data.augment value"),
        (["--range", "train.amp=0:1"], ["--range train.amp", "cached rows"], "once per train.amp value"),
        (["--grid", "data.root=a,b"], ["--grid data.root", "cannot be swept"], "once per data.root value"),
        (["--grid", "train.lrr=1,2"], ["--grid train.lrr", "unknown config key"], "'train.lr'"),
        (["--range", "train.optimizer=0:1"], ["--range train.optimizer", "not a number"], "--grid train.optimizer"),
        (["--range", "train.lr=1e-3:1e-1"], ["--range train.lr", "random search"], "--trials N"),
        (["--range", "train.lr=0:1:log", "--trials", "2"], ["--range 'train.lr=0:1:log'"], "0 < LO < HI"),
        (["--grid", "train.lr=0.1,-1"], ["trial 2", "train.lr", "-1"], "greater than 0"),
        ([], ["sweep", "nothing to sweep"], "--grid KEY=V1,V2"),
    ],
)
def test_sweep_refuses_what_it_cannot_do_in_one_line(runner, env, args, names, fix):
    assert_one_line_error(invoke(runner, "sweep", *options(env), *args), code=2, names=names, fix=fix)


@pytest.mark.parametrize(
    ("command", "setting", "word", "fix"),
    [
        ("sweep", "cache.enabled=false", "cache.enabled is false", "cache.enabled: true"),
        ("lr-find", "data.augment=light", "changes the input every epoch", "data.augment: none"),
        ("kfold", "model.unfreeze=[block5]", "features change every step", "model.unfreeze: 0"),
        ("label-issues", "data.balance=sampler", "which these heads do not use", "data.balance: weights"),
    ],
)
def test_every_command_refuses_a_config_without_cached_rows(runner, env, command, setting, word, fix):
    grid = ["--grid", "train.lr=0.1,0.2"] if command == "sweep" else []
    assert_one_line_error(
        invoke(runner, command, *options(env, setting), *grid), code=2, names=[command, "feature cache", word], fix=fix
    )


@pytest.mark.parametrize("command", ["sweep", "lr-find", "kfold", "label-issues"])
def test_every_command_refuses_a_runs_folder_it_cannot_write_before_any_work(runner, env, command, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    grid = ["--grid", "train.lr=0.1,0.2"] if command == "sweep" else []
    result = invoke(runner, command, *options(env, f"output.runs_dir={blocker}"), *grid)
    assert_one_line_error(
        result, code=6, after_notes=True, names=["output.runs_dir", str(blocker)], fix="another folder"
    )
    assert "Extracting" not in result.stderr and "Data:" not in result.stderr  # before the data is even listed


def test_the_test_split_is_never_extracted_let_alone_used_to_choose(runner, env, tmp_path):
    """The test labels here are swapped: scored on test, the head that learns nothing would win."""
    data = make_folder(tmp_path / "swapped", {"train": {"cat": 8, "dog": 8}})
    for i in range(3):
        make_image(data / "test" / "cat" / f"x{i}.jpg", CLASS_COLOURS["dog"], seed=500 + i)
        make_image(data / "test" / "dog" / f"y{i}.jpg", CLASS_COLOURS["cat"], seed=600 + i)
    result = invoke(runner, "sweep", *options(env, data=data, cache=False), "--grid", "train.lr=1e-6,0.05")
    assert result.exit_code == 0, result.output
    assert "holding out data.val_fraction=0.1" in result.stderr
    assert (
        "Extracting train features: 14 images" in result.stderr and "Extracting val features: 2 images" in result.stderr
    )
    assert "test features" not in result.stderr
    assert load_config("runs/sweep/best.yaml").train.lr == 0.05


def test_trials_run_no_backbone_forward_after_the_one_extraction(runner, env, tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    calls = conv_counter(monkeypatch)
    cold = options(env, f"cache.dir={tmp_path / 'fresh'}")
    assert invoke(runner, "sweep", *cold, "--grid", "train.lr=0.05").exit_code == 0
    one_trial = len(calls)
    assert one_trial > 0  # the extraction
    calls.clear()
    assert (
        invoke(
            runner,
            "sweep",
            *options(env, f"cache.dir={tmp_path / 'fresh2'}"),
            "--grid",
            "train.lr=0.01,0.02,0.05",
            "--grid",
            "train.weight_decay=0,1e-4",
        ).exit_code
        == 0
    )
    assert len(calls) == one_trial  # six trials: the same forwards as one
    calls.clear()
    for command in (["kfold", "--folds", "2"], ["lr-find", "--steps", "20"]):
        assert invoke(runner, *command, *cold).exit_code == 0  # warm: train+val are cached
    assert calls == []
    assert torch.get_num_threads() == threads  # heads train on one thread on a CPU; the setting is put back


# --- lr-find -----------------------------------------------------------------------------------------


def test_lr_find_suggests_an_lr_within_the_range_and_plots_the_curve(runner, env):
    result = invoke(runner, "lr-find", *options(env), "--start", "1e-6", "--end", "1", "--steps", "60")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.strip().startswith("--set train.lr="))
    lr = float(line.split("=")[1])
    assert 1e-6 <= lr <= 1
    suggested = dict(part.split() for part in result.stdout.split("Suggestions: ")[1].splitlines()[0].split(", "))
    assert set(suggested) == {"cliff", "valley", "steepest"} and all(1e-7 <= float(v) <= 1 for v in suggested.values())
    assert f"{float(suggested['cliff']):.2g}" == line.split("=")[1]  # the default: cliff
    folder = Path("runs/lr_find")
    assert (folder / "lr_find.png").read_bytes().startswith(PNG)
    rows = read_csv(folder / "lr_find.csv")
    lrs = [float(r["lr"]) for r in rows]
    assert 10 <= len(rows) <= 60 and lrs == sorted(lrs) and math.isclose(lrs[0], 1e-6, rel_tol=1e-4)
    assert float(rows[-1]["lr"]) < 1  # the schedule approaches --end without reaching it
    # The suggestions printed are those of the curve in the CSV (cliff, valley and steepest: tested below).
    smoothed = [float(r["smoothed_loss"]) for r in rows]
    again = suggest(RangeTest(lrs=lrs, losses=smoothed, smoothed=smoothed, planned=60))
    assert {name: f"{lr:.2e}" for name, (lr, _) in again.items()} == suggested


# Curves whose suggestions are known. valley (fastai's): L[i] is the length of the longest strictly falling
# sequence of points ending at i (1 where no earlier point is higher); the end is the first i where L reaches
# its maximum, start = end - L[end], and the pick is start + int(d / 3) + int(d / 3 / 2) with d = end - start:
# about halfway down the fall. steepest: the left point of the segment whose loss falls fastest against log(lr).


def _lrs(n: int) -> torch.Tensor:
    return torch.logspace(-6, 0, n, dtype=torch.float64)


def _curve(*losses: float) -> torch.Tensor:
    return torch.tensor(losses, dtype=torch.float64)


def test_valley_is_about_halfway_down_the_longest_fall():
    """Flat, then a steady fall, then a cliff up: the pick lies on the fall, not at its bottom or on the cliff."""
    losses = _curve(*[2.0] * 5, *(1.9 - 0.1 * k for k in range(10)), 3, 4, 5, 6, 7)
    # L: 1 on the flat (no earlier point is higher), 2..11 down the fall (indices 5..14), 1 on the cliff.
    # end 14, start 14 - 11 = 3, d = 11: 3 + int(3.67) + int(1.83) = 7.
    assert valley(_lrs(20), losses) == 7


def test_valley_follows_the_fall_across_a_bump():
    """The longest fall need not be contiguous: 5 > 4 > 3.9 > 3.8 > 3.7 > 3.6 > 3.5 (indices 0 1 3 4 6 7 8) steps
    over the bumps at 2 and 5, where the longest contiguous run (5..8) would put the pick at 6."""
    losses = _curve(5, 4, 6, 3.9, 3.8, 3.85, 3.7, 3.6, 3.5, 7)
    # L = 1 2 1 3 4 4 5 6 7 1: end 8, start 8 - 7 = 1, d = 7: 1 + int(2.33) + int(1.17) = 4.
    assert valley(_lrs(10), losses) == 4


def test_steepest_is_the_fastest_fall_against_log_lr():
    """The lr steps are uneven: the biggest fall per step (index 0, 1) or per unit of lr (index 0) is not the
    steepest per decade, which is the small step from 1e-3 to 1.1e-3 (0.05 over log 1.1 = 0.095: slope -0.52,
    against -0.22 for 0.5 over a decade)."""
    lrs = torch.tensor([1e-5, 1e-4, 1e-3, 1.1e-3, 1e-2, 1e-1], dtype=torch.float64)
    assert steepest(lrs, _curve(2.0, 1.5, 1.0, 0.95, 0.5, 3.0)) == 2
    # A smooth fall, 2 - tanh(2 (x - m)) over x = log10(lr), steepest at m: halfway between points 9 and 10.
    x = torch.linspace(-6, 0, 25, dtype=torch.float64)
    assert steepest(10**x, 2 - torch.tanh(2 * (x - (x[9] + x[10]) / 2))) == 9


def test_a_curve_that_never_falls_suggests_its_first_lr():
    rising = _curve(*(1 + 0.1 * k**2 for k in range(10)))  # each rise bigger than the one before
    flat = torch.full((10,), 1.5, dtype=torch.float64)
    for losses in (rising, flat):
        # No fall: L is 1 everywhere, end 0, start -1, d = 1: max(0, -1 + 0 + 0) = 0; the gentlest rise is the first.
        assert (valley(_lrs(10), losses), steepest(_lrs(10), losses)) == (0, 0)


def test_suggestions_read_the_curve_without_its_first_tenth_and_last_five_steps():
    """40 planned steps: the suggestions see steps 4..34. A steep fall before (steps 0..3) and a steeper one
    after (35..39) would win both picks if they were read."""
    steps = 40
    lrs = [1e-6 * (1 / 1e-6) ** (step / steps) for step in range(steps)]
    fall, value = [], 1.9
    for step in range(10, 30):  # falls 0.05 a step, 0.3 from step 20 to 21
        fall.append(value)
        value -= 0.3 if step == 20 else 0.05
    smoothed = [10, 8, 6, 4, *[2.0] * 6, *fall, 3, 4, 5, 6, 7, 0.1, 0.05, 0.01, 0.005, 0.001]
    picks = suggest(RangeTest(lrs=lrs, losses=smoothed, smoothed=smoothed, planned=steps))
    # Read: flat at steps 4..9 (0..5 read), the fall at 10..29 (6..25 read), a rise at 30..34. valley: L ends
    # at 25 with 21, start 4, d = 21: 4 + 7 + 3 = 14, step 18. steepest: the 0.3 fall, read index 16, step 20.
    # cliff: the minimum (0.7) at step 29, the climb at 30: a tenth of lrs[29], marked on the curve at the
    # step nearest it (a decade is 40 / 6 = 6.7 steps: step 22).
    assert picks == {
        "cliff": (lrs[29] / 10, smoothed[22]),
        "valley": (lrs[18], smoothed[18]),
        "steepest": (lrs[20], smoothed[20]),
    }


def _measured_lrs(steps: int = 100) -> list[float]:
    return [1e-7 * (10 / 1e-7) ** (step / steps) for step in range(steps)]  # lr-find's default range


def test_on_a_flat_curve_that_then_climbs_cliff_reads_the_climb_where_valley_picks_an_lr_decades_too_low():
    """The curve of a frozen random vgg11 on digits (scripts/lr_advice.py): the loss stays at chance, drifting
    down by a hair (here 0.02 % a step, 0.5 % in all), until the lr is too high and it climbs. valley's longest
    falling stretch is the whole flat drift, so it lands decades below anything that trains (on digits with
    Adam, 2.3e-4 where a sweep's best was 1e-2); cliff reads the one feature there is, the climb at step 62."""
    lrs = _measured_lrs()
    flat = [2.31 - 0.0002 * step for step in range(63)]
    smoothed = flat + [flat[-1] * (1 + 0.02 * k**2) for k in range(1, 38)]
    picks = suggest(RangeTest(lrs=lrs, losses=smoothed, smoothed=smoothed, planned=100))
    assert picks["cliff"][0] == pytest.approx(lrs[62] / 10)  # 9.1e-4: a decade below the edge
    assert picks["valley"][0] < lrs[62] / 100  # 5.2e-5, step 34: over two decades below the edge


def _smoothed(raw: list[float]) -> list[float]:
    """The bias-corrected moving average lr-find plots and reads."""
    average, out = 0.0, []
    for step, value in enumerate(raw):
        average = BETA * average + (1 - BETA) * value
        out.append(average / (1 - BETA ** (step + 1)))
    return out


def test_a_curve_that_neither_falls_nor_climbs_gives_no_lr():
    """Nothing happened between --start and --end (the head did not move in the steps given): the smoothed loss
    stays within 1 % of its minimum, or within the raw loss's batch-to-batch noise (its jitter) where that is
    larger, and the curve has nothing to read: no lr is suggested, and advice says why."""
    lrs = _measured_lrs()
    wavy = [2.303 + 0.004 * math.sin(step) for step in range(100)]  # 0.35 % up and down, no noise
    noise = torch.randn(100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    raw = [1.1 + 0.045 * float(e) for e in noise]  # 4 % noise: the smoothed loss wanders by more than 1 %
    noisy = RangeTest(lrs=lrs, losses=raw, smoothed=_smoothed(raw), planned=100)
    _, read = noisy.trimmed()
    assert read.max() > 1.01 * read.min() and 0.03 < noisy.jitter() < 0.06
    for test in (RangeTest(lrs=lrs, losses=wavy, smoothed=wavy, planned=100), noisy):
        assert suggest(test) == {}
        assert "neither fell nor climbed" in advice(*test.trimmed(), test.jitter())
    climbing = [2.0 * 1.05**step for step in range(100)]  # 5 % a step from the first: --start was too high
    test = RangeTest(lrs=lrs, losses=climbing, smoothed=climbing, planned=100)
    assert suggest(test) == {} and "lower --start" in advice(*test.trimmed(), test.jitter())
    # Flat, then the same climb: the climb's edge is read.
    flat_then_climbing = wavy[:60] + [2.303 * 1.05**step for step in range(40)]
    test = RangeTest(lrs=lrs, losses=flat_then_climbing, smoothed=flat_then_climbing, planned=100)
    assert advice(*test.trimmed(), test.jitter()) == "" and lrs[55] < 10 * suggest(test)["cliff"][0] < lrs[61]


def test_lr_find_says_when_the_curve_gives_no_usable_advice(runner, env):
    """An lr range far too low to move the head: no number, one line why, exit 0 with the plot and CSV written
    (the curve is the result, and a sweep can go on from there)."""
    result = invoke(runner, "lr-find", *options(env), "--start", "1e-12", "--end", "1e-10", "--steps", "40")
    assert result.exit_code == 0, result.output
    assert "No usable advice: the smoothed loss neither fell nor climbed" in result.stdout
    assert "--set train.lr" not in result.stdout and "Suggest" not in result.stdout
    assert (Path("runs/lr_find") / "lr_find.csv").exists()


# --- kfold -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["gap", "classifier6"])
def test_kfold_writes_out_of_fold_probabilities_of_every_train_and_val_image(runner, env, head):
    result = invoke(runner, "kfold", *options(env, f"model.head={head}"), "--folds", "3")
    assert result.exit_code == 0, result.output
    folds = [line for line in result.stdout.splitlines() if line.startswith("fold ")]
    assert len(folds) == 3 and sum(int(line.split("/")[1].rstrip(")")) for line in folds) == 39
    assert "mean acc@1 " in result.stdout and "+-" in result.stdout
    rows = read_csv(Path("runs/kfold/oof.csv"))
    expected = sorted(str(p) for split in ("train", "val") for p in (env.data / split).rglob("*.jpg"))
    assert sorted(r["path"] for r in rows) == expected  # each once; the test split not at all
    assert all(abs(sum(float(r[c]) for c in ("cat", "dog", "owl")) - 1) < 1e-4 for r in rows)
    assert {r["fold"] for r in rows} == {"1", "2", "3"}
    accuracy = sum(max(("cat", "dog", "owl"), key=lambda c: float(r[c])) == r["label"] for r in rows) / len(rows)
    assert accuracy > 0.6  # chance is 1/3


def test_stratified_folds_are_seeded_balanced_and_cover_every_index():
    labels = [0] * 10 + [1] * 7 + [2] * 3
    folds = stratified_folds(labels, 3, seed=1)
    assert sorted(i for fold in folds for i in fold) == list(range(20))
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    assert all(sum(labels[i] == 0 for i in fold) in (3, 4) for fold in folds)
    assert stratified_folds(labels, 3, seed=1) == folds != stratified_folds(labels, 3, seed=2)


# --- label issues ------------------------------------------------------------------------------------


def test_confident_learning_flags_the_confidently_other_and_ranks_by_self_confidence():
    probs = torch.tensor(
        [
            [0.9, 0.1],
            [0.8, 0.2],
            [0.3, 0.7],  # labelled 0; the third looks like 1
            [0.1, 0.9],
            [0.2, 0.8],
            [0.6, 0.4],
        ]
    )  # labelled 1; the last leans to 0
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    # thresholds: t0 = mean(0.9, 0.8, 0.3) = 0.667, t1 = mean(0.9, 0.8, 0.4) = 0.7
    suspects = find_label_issues(probs, labels)
    assert [(s.index, s.given, s.suggested) for s in suspects] == [(2, 0, 1)]
    assert suspects[0].self_confidence == pytest.approx(0.3) and suspects[0].confidence == pytest.approx(0.7)
    # index 5: p0 = 0.6 is under t0 = 0.667, so no class is confident: not flagged, however it leans


def test_label_issues_finds_planted_flips_and_moves_them_for_review(runner, env, tmp_path):
    data = make_folder(tmp_path / "noisy", {"train": {"cat": 10, "dog": 10, "owl": 10}}, seed=3)
    planted = {
        data / "train" / "cat" / "flip.0.jpg": "dog",
        data / "train" / "owl" / "flip.1.jpg": "cat",
        data / "train" / "dog" / "flip.2.jpg": "owl",
    }
    for n, (path, looks_like) in enumerate(planted.items()):
        make_image(path, CLASS_COLOURS[looks_like], seed=700 + n)
    make_image(data / "test" / "cat" / "t.jpg", CLASS_COLOURS["cat"])
    review = tmp_path / "review"
    result = invoke(runner, "label-issues", *options(env, data=data), "--out", tmp_path / "out", "--move", review)
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "out" / "label_issues.csv")
    flagged = {Path(r["path"]): r for r in rows}
    found = set(flagged) & set(planted)
    assert len(found) >= 2 and set(flagged) <= set(planted), rows  # most flips found, nothing else accused
    assert all(flagged[p]["suggested"] == planted[p] and float(flagged[p]["confidence"]) > 0.5 for p in found)
    assert (tmp_path / "out" / "label_issues.png").read_bytes().startswith(PNG)
    assert len(read_csv(tmp_path / "out" / "oof.csv")) == 33
    for path in flagged:  # moved, relative path kept, nothing deleted
        assert not path.exists() and (review / path.relative_to(data)).is_file()
    assert f"Moved {len(flagged)} file(s) to {review}" in result.stdout
    assert len(list(data.rglob("*.jpg"))) == 34 - len(flagged)


def test_a_model_too_weak_to_judge_labels_moves_nothing_without_force(runner, env, tmp_path):
    data = tmp_path / "same"
    for name in ("cat", "dog", "owl"):  # one colour for all three: no model can tell them apart
        for i in range(8):
            make_image(data / "train" / name / f"{name}.{i}.jpg", CLASS_COLOURS["cat"], seed=40 * len(name) + i)
    make_image(data / "test" / "cat" / "t.jpg", CLASS_COLOURS["cat"])
    review, out = tmp_path / "review", tmp_path / "out"
    result = invoke(runner, "label-issues", *options(env, data=data), "--folds", "3", "--out", out, "--move", review)
    line = assert_one_line_error(
        result,
        code=1,
        after_notes=True,
        allow_stdout=True,  # the findings, written and printed before the refusal to move
        names=["too weak to judge labels", "out-of-fold acc@1"],
        fix="--force",
    )
    assert "moved nothing" in line and not review.exists() and len(list(data.rglob("*.jpg"))) == 25
    assert read_csv(out / "label_issues.csv") and "suspected label issue(s)" in result.stdout  # the findings stay
    forced = invoke(runner, "label-issues", *options(env, data=data), "--folds", "3", "--move", review, "--force")
    assert forced.exit_code == 0 and "too weak" in forced.stderr and "Moved" in forced.stdout, forced.output
    assert len(list(review.rglob("*.jpg"))) == 25 - len(list(data.rglob("*.jpg")))


def test_weak_model_thresholds_name_what_tripped_them():
    assert too_weak(0.95, 3, 100) is None
    assert too_weak(0.66, 12, 100) is None  # the weakest good model measured (precision 58 %)
    assert "below 60%" in too_weak(0.38, 10, 100) and "flags" not in too_weak(0.38, 10, 100)
    assert "flags 50.0% of the images, more than 15%" in too_weak(0.9, 50, 100)


def test_label_issues_will_not_move_into_the_data_it_reads(runner, env):
    assert_one_line_error(
        invoke(runner, "label-issues", *options(env), "--move", env.data / "review"),
        code=6,
        names=[f"--move {env.data / 'review'}", "inside data.root"],
        fix="a folder outside it",
    )


def test_best_yaml_and_results_survive_a_diverging_trial(runner, env):
    result = invoke(runner, "sweep", *options(env, "train.optimizer=sgd"), "--grid", "train.lr=0.05,1e30")
    assert result.exit_code == 0, result.output
    rows = read_csv(Path("runs/sweep/results.csv"))
    assert [r["status"] for r in rows] == ["ok", "diverged"] and "diverged" in result.stderr
    assert yaml.safe_load(Path("runs/sweep/best.yaml").read_text())["train"]["lr"] == 0.05


# --- the hooks that make many runs cheap ---------------------------------------------------------------


def test_the_prefix_hash_is_remembered_for_an_unchanged_weights_file(env, tmp_path, monkeypatch):
    import vggft.features.cache
    from vggft.tuning.prepare import prepare

    hashed = []
    real = vggft.features.cache.fingerprint
    monkeypatch.setattr(vggft.features.cache, "fingerprint", lambda tensors: hashed.append(1) or real(tensors))
    weights = tmp_path / "he.pth"
    weights.write_bytes(env.weights.read_bytes())

    def folder(path: Path = weights, head: str = "gap") -> Path:
        hashed.clear()
        cfg = load_config(
            None,
            [
                a
                for a in options(env, f"model.weights={path}", f"cache.dir={tmp_path / 'c'}", f"model.head={head}")
                if a not in ("--set", "--quiet")
            ],
        )
        return prepare(cfg, "test").source.cache.folder

    first = folder()
    assert hashed == [1]
    assert folder() == first and hashed == []  # remembered
    weights.write_bytes(weights.read_bytes())  # the same bytes, rewritten: a new ctime, hashed again
    assert folder() == first and hashed == [1]
    backbone = {k: v for k, v in torch.load(weights, weights_only=True).items() if k.startswith("features.")}
    torch.save(backbone, tmp_path / "backbone.pth")  # the classifier's first layer comes from the seed then
    folder(tmp_path / "backbone.pth", "classifier6")
    folder(tmp_path / "backbone.pth", "classifier6")
    assert hashed == [1]  # not remembered: the prefix is not the file's alone
    folder(weights, "classifier6")
    folder(weights, "classifier6")
    assert hashed == []


def test_rows_are_views_of_the_cache_gathered_only_per_batch(env):
    from vggft.tuning.prepare import extract, prepare

    cfg = load_config(None, [a for a in options(env) if a not in ("--set", "--quiet")])
    data = prepare(cfg, "test")
    samples = data.splits["train"]
    rows, labels = extract(data, {"train": samples})["train"]
    stored = data.source.cache.rows
    from vggft.features.cache import file_key

    first = stored[file_key(samples[0][0])]
    assert rows[0].data_ptr() == first.data_ptr()  # no second copy of a row
    assert rows.shape == (len(samples), first.shape[0]) and len(labels) == len(samples)
    picked = rows.take(torch.tensor([2, 0]))
    assert picked[1].data_ptr() == first.data_ptr()
    assert torch.equal(rows[torch.tensor([2, 0])], torch.stack([rows[2], rows[0]]))
    assert torch.equal(rows.tensor()[5], rows[5])
