"""Settings that would silently do nothing are refused, config mistakes are answered before torch loads,
and the refusals of distributed training and check-data's exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, assert_one_line_error, deadline, invoke, make_folder, source_path
from vggft.config.loading import load_config
from vggft.utils.errors import ConfigError


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.head_only_epochs=1", "train.epochs=3"],
            "train.head_only_epochs: 1 does nothing without model.unfreeze",
        ),
        (["model.unfreeze=1", "train.head_only_epochs=3", "train.epochs=3"], "leaves no epoch of the 3"),
        (["train.backbone_lr=0.01"], "train.backbone_lr does nothing while the backbone is frozen"),
        (
            ["train.scheduler=onecycle", "train.warmup_epochs=1"],
            "train.warmup_epochs does nothing with scheduler onecycle",
        ),
        (["train.nesterov=true"], "train.nesterov needs optimizer sgd with momentum > 0"),
        (["train.optimizer=adam", "train.momentum=0.9"], "train.momentum is an sgd setting"),
        (["train.epochs=0"], "train.epochs: expected a number greater than 0"),
    ],
)
def test_settings_that_would_do_nothing_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_early_stopping_without_a_val_split_is_refused(runner, pet):
    result = invoke(runner, "train", "--set", f"data.root={pet}", *FAST, "--set", "train.early_stopping.patience=2")
    assert_one_line_error(
        result,
        code=2,
        after_notes=True,
        names=["train.early_stopping.patience", "val split"],
        fix="set data.val_fraction",
    )


def test_a_config_typo_is_answered_before_torch_is_imported(tmp_path):
    code = (
        "import sys; from typer.testing import CliRunner; from vggft.cli import app; "
        "r = CliRunner().invoke(app, ['train', '--set', 'train.epocs=1']); "
        "print(r.exit_code, 'torch' in sys.modules)"
    )
    env = {"PYTHONPATH": ":".join(source_path()), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    ).stdout.split()
    assert out == ["2", "False"]


SENSELESS_OPTIONS = [
    (["train", "--nproc", "0"], "--nproc", "1 or more processes"),
    (["eval", "--topk", "0"], "--topk", "1 or more"),
    (["eval", "--top-losses", "-1"], "--top-losses", "0 (no grid) or more"),
    (["eval", "--explain"], "--explain", "add --misclassified N"),
    (["summary", "--num-classes", "0"], "--num-classes", "1 or more"),
    (["show-batch", "--count", "0"], "--count", "1 or more images"),
    (["check-data", "--max-imbalance", "1"], "--max-imbalance", "a ratio greater than 1"),
    (["check-data", "--similarity", "0.5"], "--similarity", "add --near-duplicates"),
    (["check-data", "--near-duplicates", "--similarity", "1.5"], "--similarity", "above 0 and at most 1"),
    (["predict", "x.jpg", "--batch-size", "0"], "--batch-size", "1 or more images"),
    (["explain", "x.jpg", "--batch-size", "0"], "--batch-size", "1 or more images"),
    (["lr-find", "--steps", "5"], "--steps", "10 or more"),
    (["lr-find", "--start", "1", "--end", "0.1"], "--start and --end", "0 < --start < --end"),
    (["kfold", "--folds", "1"], "--folds", "2 or more"),
    (["label-issues", "--show", "-1"], "--show", "0 (no grid) or more"),
    (["make-demo", "--test-per-class", "0"], "--test-per-class", "1 or more images"),
]


def test_a_senseless_option_is_refused_before_the_config_is_read_or_torch_imported(tmp_path):
    """Each command checks its options first: one line naming the option, exit 2, with no torch imported — and
    before anything else that is wrong (here every command also gets a config file that does not exist)."""
    commands = [
        [*argv, "--config", "missing.yaml"] if argv[0] != "make-demo" else argv for argv, *_ in SENSELESS_OPTIONS
    ]
    code = (
        "import json, sys; from typer.testing import CliRunner; from vggft.cli import app; "
        f"results = [CliRunner().invoke(app, argv) for argv in {commands!r}]; "
        "print(json.dumps([[r.exit_code, r.stderr] for r in results] + ['torch' in sys.modules]))"
    )
    env = {"PYTHONPATH": ":".join(source_path()), "PATH": "/usr/bin:/bin"}
    with deadline(60):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    *results, torch_imported = json.loads(out.stdout)
    assert torch_imported is False
    for (argv, option, expected), (exit_code, stderr) in zip(SENSELESS_OPTIONS, results, strict=True):
        lines = stderr.strip().splitlines()
        assert exit_code == 2 and len(lines) == 1, (argv, stderr)
        assert lines[0].startswith(f"error: {option}") and expected in lines[0], (argv, lines[0])


def test_the_library_refuses_the_same_options_in_the_same_words(tmp_path):
    """Python callers get the CLI's checks: each library function checks its own arguments before any work."""
    from vggft.data.check import check_data
    from vggft.data.demo import make_demo_data
    from vggft.diagnostics.evaluation import evaluate_weights
    from vggft.diagnostics.explain import explain
    from vggft.diagnostics.preview import show_batch, summary
    from vggft.model.inference import predict
    from vggft.tuning.kfold import kfold
    from vggft.tuning.label_issues import label_issues
    from vggft.tuning.lr_find import lr_find
    from vggft.utils.torchrun import launch_train

    cfg, missing = load_config(), tmp_path / "missing.pt"
    calls = {
        "--nproc": lambda: launch_train(0, []),
        "--topk": lambda: evaluate_weights(missing, topk=0),
        "--top-losses": lambda: evaluate_weights(missing, top_losses=-1),
        "--num-classes": lambda: summary(cfg, 0),
        "--count": lambda: show_batch(cfg, count=0),
        "--max-imbalance": lambda: check_data(cfg, max_imbalance=1.0),
        "--batch-size": lambda: predict(missing, [], batch_size=0),
        "--steps": lambda: lr_find(cfg, steps=5),
        "--folds": lambda: kfold(cfg, 1),
        "--show": lambda: label_issues(cfg, show=-1),
        "--test-per-class": lambda: make_demo_data(tmp_path / "demo", 1, 0),
    }
    for option, call in calls.items():
        with pytest.raises(ConfigError, match=f"^{option}: expected "):
            call()
    with pytest.raises(ConfigError, match="^--batch-size: expected 1 or more images"):
        explain(missing, [], batch_size=0)
    assert not (tmp_path / "demo").exists()


def test_distributed_refusals(runner, pet, monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) what cannot shard is refused before the process group is joined."""
    from vggft.training.train import _check_distributed

    with pytest.raises(ConfigError, match="data.balance: 'sampler' cannot shard across processes"):
        _check_distributed(load_config(None, ["data.balance=sampler"]))
    with pytest.raises(ConfigError, match="two-stage training is not supported under torchrun"):
        _check_distributed(load_config(None, ["model.unfreeze=1", "train.head_only_epochs=1"]))
    result = invoke(runner, "train", "--nproc", "0", "--set", f"data.root={pet}")
    assert_one_line_error(result, code=2, names=["--nproc", "got 0"], fix="1 or more")


def test_check_data_exit_code_follows_imbalance(runner, tmp_path):
    skewed = make_folder(tmp_path / "skewed", {"train": {"cat": 6, "dog": 2}, "test": {"cat": 1, "dog": 1}})
    result = invoke(runner, "check-data", "--set", f"data.root={skewed}", "--max-imbalance", "2.5", "-q")
    assert result.exit_code == 1 and "class imbalance 3.0x in train" in result.stdout
    result = invoke(runner, "check-data", "--set", f"data.root={skewed}", "--max-imbalance", "4", "-q")
    assert result.exit_code == 0 and "No problems found." in result.stdout


def test_a_mistake_from_set_is_named_so_even_beside_a_config_file(runner, tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("train:\n  epochs: 3\n")
    result = invoke(runner, "train", "--config", config, "--set", "train.head_only_epochs=2")
    line = assert_one_line_error(result, code=2, names=["--set", "train.head_only_epochs"], fix="set model.unfreeze")
    assert str(config) not in line
    config.write_text("train:\n  epochs: 3\n  head_only_epochs: 2\n")
    result = invoke(runner, "train", "--config", config)
    line = assert_one_line_error(
        result, code=2, names=[str(config), "train.head_only_epochs"], fix="set model.unfreeze"
    )
    assert "--set" not in line


def test_output_folders_that_cannot_be_made_are_found_before_any_work(runner, pet):
    Path("afile").write_text("a file where a folder should be")
    result = invoke(runner, "train", "--set", f"data.root={pet}", *FAST, "--set", "output.runs_dir=afile/runs")
    assert_one_line_error(
        result,
        code=6,
        names=["output.runs_dir", "'afile/runs'", f"'{Path('afile').resolve()}'"],
        fix="--set output.runs_dir=PATH",
    )  # one line: no "Data:" note, the scan never ran
    (pet / "train" / "cat" / "broken.jpg").write_bytes(b"not a picture")
    result = invoke(runner, "check-data", "--set", f"data.root={pet}", "--quarantine", "afile/q", "-q")
    assert_one_line_error(
        result,
        code=6,
        names=["--quarantine", "'afile/q'"],  # before the scan and any move
        fix="give another folder",
    )
    assert (pet / "train" / "cat" / "broken.jpg").exists()


def test_resume_keeps_its_run_folder_and_names_no_way_back_to_itself(runner, pet):
    assert invoke(runner, "train", "--set", f"data.root={pet}", *FAST).exit_code == 0
    result = invoke(runner, "train", "--resume", "runs/train/last.pt", "--name", "elsewhere")
    assert_one_line_error(result, code=2, names=["--set output.name", "when resuming"], fix="start a new run")
    result = invoke(runner, "train", "--resume", "runs/train/last.pt", "--set", "train.epochs=3", "-q")
    assert result.exit_code == 0 and "Replaced" not in result.stderr


def _laughs(levels: int = 9) -> str:
    """A billion-laughs YAML: each anchor ten times the one before, all under data.split."""
    lines = ["a0: &a0 [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + f"\ndata:\n  split: *a{levels - 1}\n"


def test_hostile_yaml_is_one_line_in_bounded_time(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_laughs())
    assert len(bomb.read_bytes()) < 1000
    with deadline(20), pytest.raises(ConfigError) as caught:  # expanded, the 10^9 numbers would never end
        load_config(bomb)
    assert len(str(caught.value)) < 300
    assert str(caught.value).startswith(f"{bomb}: ")
    deep = tmp_path / "deep.yaml"
    deep.write_text("data:\n  split: " + "[" * 600 + "]" * 600 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(deep)
    huge = tmp_path / "huge.yaml"
    huge.write_text("# padding\n" * 1_100_000)
    with pytest.raises(ConfigError, match="too large for a config"):
        load_config(huge)


def test_a_same_size_rewrite_with_its_old_mtime_gets_new_rows(pet):
    """cp -p / rsync -a / fixed-size formats: a file rewritten in place with the same size and its old mtime
    restored is a new file to the feature cache (its ctime moved), not its old rows."""
    import os

    import torch

    from conftest import make_image
    from vggft.features.cache import FeatureSource
    from vggft.model.build import build_model

    cfg = load_config(None, [f"data.root={pet}", "data.image_size=32", "data.resize=36", "model.weights=null"])
    torch.manual_seed(0)
    source = FeatureSource(build_model(cfg.model, 2, None), cfg, torch.device("cpu"), None)
    victim = make_image(pet / "train" / "cat" / "fixed.bmp", (200, 60, 40), seed=1)  # BMP: size from pixels alone
    before = source.rows([(str(victim), 0)]).tensor()
    stat = victim.stat()
    make_image(victim, (0, 250, 0), seed=9)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert victim.stat().st_size == stat.st_size and victim.stat().st_mtime_ns == stat.st_mtime_ns
    after = source.rows([(str(victim), 0)]).tensor()
    assert not torch.equal(before, after)
