"""The ``vggft`` command: parses, calls the library, prints. Errors become one line and an exit code here."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, TypeAlias

import typer
from typer.models import OptionInfo

from vggft.config import options
from vggft.utils import torchrun
from vggft.utils.errors import Interrupted, VggftError

app = typer.Typer(
    help="Fine-tune ImageNet-pretrained VGG networks on a folder of labelled images.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=True,
    pretty_exceptions_enable=False,
)

_state = {"debug": False, "verbose": False}

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        metavar="FILE|PRESET",
        help="YAML config file, or a shipped preset: pet, keras_gap, demo (vggft configs lists them).",
    ),
]


def _set_option(example: str) -> OptionInfo:
    """--set, with an example that fits the command: ``Annotated[list[str] | None, _set_option(...)]``."""
    return typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help=f"Override a config key (repeatable), e.g. --set {example}; every key: vggft configs --defaults.",
    )


SetOpt: TypeAlias = Annotated[list[str] | None, _set_option("train.epochs=1")]

# The keys people change most, as flags of their own: each is exactly the --set it stands for (the same
# checks; errors name the flag). Parameter name -> (flag, config key, metavar).
SHORT_FLAGS = {
    "data": ("--data", "data.root", "DIR"),
    "epochs": ("--epochs", "train.epochs", "N"),
    "lr": ("--lr", "train.lr", "FLOAT"),
    "batch_size": ("--batch-size", "data.batch_size", "N"),
    "image_size": ("--image-size", "data.image_size", "PX"),
    "arch": ("--arch", "model.arch", "NAME"),
    "weights_from": ("--weights-from", "model.weights", "NAME|FILE"),
    "device": ("--device", "train.device", "DEVICE"),
    "seed": ("--seed", "train.seed", "N"),
}


def _flag(param: str) -> OptionInfo:
    flag, key, metavar = SHORT_FLAGS[param]
    return typer.Option(flag, metavar=metavar, help=f"Same as --set {key}=VALUE.", rich_help_panel="Shortcuts")


DataFlag = Annotated[str | None, _flag("data")]
EpochsFlag = Annotated[str | None, _flag("epochs")]
LrFlag = Annotated[str | None, _flag("lr")]
BatchSizeFlag = Annotated[str | None, _flag("batch_size")]
ImageSizeFlag = Annotated[str | None, _flag("image_size")]
ArchFlag = Annotated[str | None, _flag("arch")]
WeightsFromFlag = Annotated[str | None, _flag("weights_from")]
DeviceFlag = Annotated[str | None, _flag("device")]
SeedFlag = Annotated[str | None, _flag("seed")]


def _with_flags(set_: list[str] | None, arguments: dict) -> list[str]:
    """--set's overrides, then one per short flag given among a command's ``arguments`` (its ``locals()``); a
    flag and a --set of the same key is refused rather than one silently winning. A flag's value is the text
    typed (a str); a command's own option of the same name (predict's --batch-size, kfold's --seed) is parsed
    by typer (an int) and is not a flag."""
    from vggft.config.loading import Override, parse_override
    from vggft.utils.errors import ConfigError

    overrides = list(set_ or [])
    keys = {parse_override(text)[0] for text in overrides}
    for param, (flag, key, _) in SHORT_FLAGS.items():
        value = arguments.get(param)
        if not isinstance(value, str):
            continue
        if key in keys:
            raise ConfigError(f"{flag} and --set {key}: both set {key}; give one of them")
        overrides.append(Override(key, value, flag, literal=key == "data.root"))  # a path is not YAML
    return overrides


QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or progress lines.")]


class Split(str, Enum):
    train = "train"
    val = "val"
    test = "test"


class ExportFormat(str, Enum):
    onnx = "onnx"
    pt2 = "pt2"
    torchscript = "torchscript"


def _no_flag_metavar() -> None:
    """typer 0.2x shows '<bool>' beside on/off flags in --help, as if they took a value: show nothing there."""
    try:
        from typer.core import TyperOption
    except ImportError:  # pragma: no cover - typer without its own core
        return
    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or shown.__module__ == __name__:  # a typer without it, or patched already (by this module)
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]  # a patch of typer's class


_no_flag_metavar()
WeightsOpt = Annotated[Path, typer.Option("--weights", "-w", help="Weights saved by vggft or the tutorial.")]
InputsArg = Annotated[
    list[Path],
    typer.Argument(
        metavar="IMAGE_OR_DIR", help="Image files and/or folders (searched recursively, hidden files skipped)."
    ),
]


def _handle_errors(command):
    """The one place where a user error becomes a line on stderr and an exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Interrupted as err:
            if _state["debug"]:
                raise
            typer.echo(str(err), err=True)
            raise typer.Exit(err.exit_code) from None
        except VggftError as err:
            if _state["debug"]:
                raise
            rank = _rank()  # under torchrun a pre-flight error is met by every rank and said by rank 0 only
            if rank == 0 or err.rank_specific:
                typer.echo(f"error (rank {rank}): {err}" if rank else f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            if _state["debug"]:
                raise
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _timed(command):
    """The command's wall time as the last note on stderr, for the commands that take a while."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        started = time.monotonic()
        result = command(*args, **kwargs)
        from vggft.utils.logs import duration, log

        if _rank() == 0:
            log.info(f"Done in {duration(time.monotonic() - started)}")
        return result

    return wrapper


def _rank() -> int:
    return torchrun.environment_rank()


def _config(config: Path | None, overrides: list[str] | None):
    """The config, checked before torch is imported: a typo costs milliseconds, not seconds."""
    from vggft.config.loading import load_config

    return load_config(config, overrides or [])


def _output(quiet: bool) -> None:
    """Notes and progress go to stderr; stdout carries the command's result alone."""
    from vggft.utils.logs import configure

    configure(progress=not quiet, details=_state["verbose"])


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _check_pretrained(cfg) -> None:
    """A model.weights that is neither null, a file nor a torchvision weights name of model.arch is a config
    mistake: said before any work (torchvision's list of names is read; nothing is loaded)."""
    from vggft.config.schema import weights_is_file

    name = cfg.model.weights
    if name is None or weights_is_file(name):
        return  # a file: read (and judged) when the model is built
    from vggft.model.pretrained import torchvision_weights
    from vggft.utils.errors import ConfigError, WeightsError

    try:
        torchvision_weights(cfg.model.arch, name)
    except WeightsError as err:
        fix = (
            "for random init write null, not None"
            if name.lower() == "none"
            else "use one of those names, a local .pth state_dict, or null for random init"
        )
        raise ConfigError(f"{err}; {fix}") from None


def _print_version(value: bool) -> None:
    if value:
        from vggft import __version__

        typer.echo(f"vggft {__version__}")
        raise typer.Exit()


EXAMPLES = {
    "train": [
        "vggft train --config pet --data data/pets --epochs 5 --lr 1e-3",
        "vggft train --config keras_gap --data data/flowers --image-size 160 --name flowers",
        "vggft train --resume runs/flowers/last.pt --epochs 10",
    ],
    "eval": [
        "vggft eval --weights models/VGG16.pt --data data/pets",
        "vggft eval -w models/VGG16.pt --split val --top-losses 16 --explain",
    ],
    "summary": ["vggft summary --config keras_gap", "vggft summary --arch vgg11 --image-size 64 --num-classes 10"],
    "show-batch": [
        "vggft show-batch --config pet --data data/pets",
        "vggft show-batch --split test --count 16 --out batch.png",
    ],
    "check-data": [
        "vggft check-data --data data/pets",
        "vggft check-data --data data/pets --near-duplicates --quarantine data/bad",
    ],
    "predict": [
        "vggft predict photos/ --weights models/VGG16.pt --topk 3",
        "vggft predict cat.jpg --weights models/VGG16.onnx --json",
        "vggft predict photos/ --weights models/VGG16.pt --coverage 0.9",
    ],
    "explain": ["vggft explain cat.jpg --weights models/VGG16.pt", "vggft explain photos/ --class dog --out cams/"],
    "export": ["vggft export --weights models/VGG16.pt", "vggft export --weights models/VGG16.pt --format pt2"],
    "sweep": [
        "vggft sweep --config pet --data data/pets --grid train.lr=1e-4,1e-3,1e-2",
        "vggft sweep --range train.lr=1e-5:1e-1:log --trials 8 --save-best",
    ],
    "lr-find": [
        "vggft lr-find --config pet --data data/pets",
        "vggft lr-find --data data/pets --set train.optimizer=adam --suggest steepest",
    ],
    "kfold": ["vggft kfold --config pet --data data/pets --folds 5"],
    "label-issues": ["vggft label-issues --data data/pets", "vggft label-issues --data data/pets --move review/"],
    "sidecar": ["vggft sidecar -w models/VGG16.pt", "vggft sidecar -w models/VGG16.pt --accept"],
    "calibrate": [
        "vggft calibrate -w models/VGG16.pt",
        "vggft calibrate -w models/VGG16.pt --data data/more --split val",
    ],
    "make-demo": ["vggft make-demo data/demo && vggft train --config demo"],
    "configs": ["vggft configs", "vggft configs --defaults > my.yaml"],
}


def _examples(command: str) -> str:
    """The foot of a command's --help: its examples, one per paragraph (typer rewraps a paragraph)."""
    return "Examples:\n\n" + "\n\n".join(EXAMPLES[command])


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also the notes on vggft's internals (cache, shared steps).")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", "-V", help="Print the version and exit.", callback=_print_version, is_eager=True),
    ] = False,
) -> None:
    _state["debug"] = debug
    _state["verbose"] = verbose
    if hasattr(sys.stdout, "reconfigure"):  # a file name that is not UTF-8 is printed as its bytes, as ls does
        sys.stdout.reconfigure(errors="surrogateescape")


@app.command(epilog=_examples("train"))
@_handle_errors
@_timed
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data: DataFlag = None,
    epochs: EpochsFlag = None,
    lr: LrFlag = None,
    batch_size: BatchSizeFlag = None,
    image_size: ImageSizeFlag = None,
    arch: ArchFlag = None,
    weights_from: WeightsFromFlag = None,
    device: DeviceFlag = None,
    seed: SeedFlag = None,
    name: Annotated[str | None, typer.Option(help="Run folder name under output.runs_dir.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Go on from a run's last.pt (its config, --set on top).")] = None,
    nproc: Annotated[int, typer.Option(help="Processes to train with (torch.distributed.run on this machine).")] = 1,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune: frozen backbone, new head; evaluate on test; save weights, sidecar and a run folder."""
    set_ = _with_flags(set_, locals())
    torchrun.check_nproc(nproc)
    overrides = [*(set_ or []), *([f"output.name={name}"] if name else [])]
    if resume:
        if config is not None:
            from vggft.utils.errors import ConfigError

            raise ConfigError(
                f"--config {config}: a resumed run goes on with its own config (in its last.pt); "
                "drop --config, or start a new run with it"
            )
        from vggft.config.loading import resume_overrides_refused

        resume_overrides_refused(overrides)  # before torch is imported (--name too: the run folder is the run's)
        from vggft.training.train import read_resume

        cfg, checkpoint = read_resume(resume, overrides)
    else:
        cfg, checkpoint = _config(config, overrides), None
    _check_pretrained(cfg)
    _output(quiet)
    if nproc != 1:
        args = [
            *(["--config", str(config)] if config else []),
            *[a for v in set_ or [] for a in ("--set", v)],
            *(["--name", name] if name else []),
            *(["--resume", str(resume)] if resume else []),
            *(["--quiet"] if quiet else []),
        ]
        raise typer.Exit(torchrun.launch_train(nproc, args, debug=_state["debug"]))  # the config is valid
    from vggft.training.train import RUN_FILES, fit

    result = fit(cfg, resume=resume, checkpoint=checkpoint)
    if _rank() == 0:
        if result.test is not None:
            typer.echo(f"Test: {result.test.summary_line()}")
        typer.echo(f"Saved {result.weights} (sidecar {result.sidecar}); run folder {result.run_dir}: {RUN_FILES}")


@app.command("eval", epilog=_examples("eval"))
@_handle_errors
@_timed
def eval_(
    weights: WeightsOpt = Path("models/VGG16.pt"),
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, _set_option("data.root=other/images")] = None,
    data: DataFlag = None,
    device: DeviceFlag = None,
    split: Annotated[Split, typer.Option(help="Which split to score.")] = Split.test,
    topk: Annotated[int, typer.Option(help="Also report acc@k for this k (1 or more).")] = 5,
    misclassified: Annotated[int, typer.Option(help="Save a grid of the N most confident mistakes (0: none).")] = 0,
    top_losses: Annotated[int, typer.Option(help="Save a grid and a CSV of the N highest-loss images (0: none).")] = 0,
    explain: Annotated[bool, typer.Option("--explain", help="Draw Grad-CAM heatmaps on those grids.")] = False,
    plots: Annotated[Path | None, typer.Option(help="Folder for the PNGs (default: beside the weights).")] = None,
    coverage: Annotated[
        float | None,
        typer.Option(help="Also report the empirical coverage and mean size of the conformal sets at this level."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """acc@1 and acc@k over every image of the test split, per-class precision/recall/F1, confusion matrix."""
    set_ = _with_flags(set_, locals())
    options.check_eval(topk, misclassified, top_losses, explain)
    from vggft.model.conformal import check_coverage

    check_coverage(coverage)
    _output(quiet)
    from vggft.diagnostics.evaluation import evaluate_weights

    metrics, _, written = evaluate_weights(
        weights,
        config,
        set_ or [],
        split=split.value,
        topk=topk,
        misclassified=misclassified,
        plots_dir=plots,
        top_losses=top_losses,
        explain=explain,
        coverage=coverage,
    )
    if as_json:
        typer.echo(json.dumps({**metrics.to_dict(), "files": [str(p) for p in written]}, indent=2))
        return
    typer.echo(metrics.summary_line())
    k = max(metrics.topk_correct)
    if k > 1:
        typer.echo(
            f"acc@{k} {100 * metrics.topk_correct[k] / max(metrics.total, 1):.2f}% "
            f"({metrics.topk_correct[k]}/{metrics.total})"
        )
    _echo_per_class(metrics.per_class())
    _echo_confusion(metrics, written)
    _echo_eval_extras(metrics)
    for path in written:
        typer.echo(f"Wrote {path}")


def _echo_per_class(rows: list[dict]) -> None:
    """eval's per-class table: images, correct, accuracy, precision and F1 of each class."""
    width = max(len("class"), *(len(r["class"]) for r in rows))
    typer.echo(f"{'class':<{width}}  {'images':>7}  {'correct':>7}  {'accuracy':>8}  {'precision':>9}  {'f1':>6}")
    for r in rows:  # precision of a class never predicted is undefined: n/a, not 0 %
        precision = f"{'n/a':>9}" if r["precision"] is None else f"{100 * r['precision']:>8.2f}%"
        typer.echo(
            f"{r['class']:<{width}}  {r['support']:>7}  {r['correct']:>7}  {100 * r['accuracy']:>7.2f}%"
            f"  {precision}  {r['f1']:>6.3f}"
        )


def _echo_confusion(metrics, written: list[Path]) -> None:
    """The confusion matrix as text while it can be read on a screen; past the classes its picture draws, the
    CSV written beside the picture holds it (2,000 classes would print 24 MB of rows 12,000 characters wide)."""
    from vggft.reporting.plots import CONFUSION_DRAWN

    n = len(metrics.class_names)
    if n <= CONFUSION_DRAWN:
        typer.echo("Confusion matrix (rows: true class)")
        typer.echo(metrics.confusion_table())
        return
    pictures = [
        p for p in written if p.name.endswith(".png") and ".confusion_" in p.name and "normalized" not in p.name
    ]
    where = [p.with_suffix(".csv") for p in pictures if p.with_suffix(".csv").is_file()]
    held = f"all of it in {where[0]}" if where else "vggft eval --json holds all of it"
    typer.echo(f"Confusion matrix: {n} classes, too many to print ({held}); the most confused pairs follow")


def _echo_eval_extras(metrics) -> None:
    """Most confused pairs and calibration, below eval's confusion matrix."""
    pairs = metrics.confused_pairs(limit=10)
    if pairs:
        typer.echo("Most confused pairs (true -> predicted: count)")
        width = max(len(f"{p['true']} -> {p['predicted']}") for p in pairs)
        for p in pairs:
            typer.echo(f"  {p['true'] + ' -> ' + p['predicted']:<{width}}  {p['count']}")
    cal = metrics.extra["calibration"]
    line = f"ECE ({cal['bins']} bins): {cal['ece']:.4f} uncalibrated"
    if cal["temperature"] is not None:
        line += f", {cal['ece_calibrated']:.4f} calibrated (temperature {cal['temperature']:.3f})"
    else:
        line += " (the sidecar holds no temperature: trained without a val split, or train.calibrate: false)"
    typer.echo(line)
    if "coverage" in metrics.extra:
        _echo_coverage(metrics.extra["coverage"])


def _echo_coverage(report: dict) -> None:
    """eval --coverage: the sets' coverage and mean size, overall and per class."""
    target = report["target"]
    if "missing" in report:
        typer.echo(f"Coverage: {report['missing']}")
        return
    typer.echo(
        f"Conformal sets ({report['method']}, target coverage {target:.0%}, marginal: over images, not per class): "
        f"coverage {100 * report['coverage']:.2f}%, mean set size {report['mean_size']:.2f}, "
        f"{report['empty']} empty, {report['images']} images"
    )
    width = max(len("class"), *(len(r["class"]) for r in report["per_class"]))
    typer.echo(f"  {'class':<{width}}  {'images':>7}  {'coverage':>8}  {'mean size':>9}")
    for r in report["per_class"]:
        typer.echo(f"  {r['class']:<{width}}  {r['images']:>7}  {100 * r['coverage']:>7.2f}%  {r['mean_size']:>9.2f}")


@app.command(epilog=_examples("summary"))
@_handle_errors
def summary(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, _set_option("model.head=gap")] = None,
    data: DataFlag = None,
    image_size: ImageSizeFlag = None,
    arch: ArchFlag = None,
    num_classes: Annotated[
        int | None,
        typer.Option(
            help="Classes of the new head (default: model.num_classes, or the class folders in data.root, or 2)."
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """The torchinfo table of the model as configured; needs no data and no weights file."""
    set_ = _with_flags(set_, locals())
    options.check_summary(num_classes)
    cfg = _config(config, set_)
    _output(quiet)
    from vggft.diagnostics.preview import summary as model_summary
    from vggft.diagnostics.preview import summary_text

    typer.echo(summary_text(model_summary(cfg, num_classes)))


@app.command("show-batch", epilog=_examples("show-batch"))
@_handle_errors
def show_batch(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, _set_option("data.augment=light")] = None,
    data: DataFlag = None,
    image_size: ImageSizeFlag = None,
    batch_size: BatchSizeFlag = None,
    split: Annotated[
        Split, typer.Option(help="Which split to draw from (train: with its augmentation).")
    ] = Split.train,
    out: Annotated[
        Path | None,
        typer.Option(help="PNG path, or a folder for batch_<split>.png (default: a new run folder, runs/show_batch)."),
    ] = None,
    count: Annotated[int | None, typer.Option(help="Images in the grid (default: data.batch_size).")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Save a PNG grid of one batch, de-normalised to real colours, titled with class names."""
    set_ = _with_flags(set_, locals())
    options.check_show_batch(count)
    cfg = _config(config, set_)
    _output(quiet)
    from vggft.diagnostics.preview import show_batch as save_batch

    path = save_batch(cfg, split=split.value, out=out, count=count)
    typer.echo(str(path))


@app.command("check-data", epilog=_examples("check-data"))
@_handle_errors
@_timed
def check_data(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, _set_option("data.root=path/to/images")] = None,
    data: DataFlag = None,
    quarantine: Annotated[
        Path | None, typer.Option(help="Move unreadable files here (paths kept); deletes nothing.")
    ] = None,
    max_imbalance: Annotated[
        float, typer.Option(help="Largest/smallest class ratio that counts as a problem (greater than 1).")
    ] = 10.0,
    near_duplicates: Annotated[
        bool,
        typer.Option(
            "--near-duplicates",
            help="Also find resized, recompressed or cropped copies (cosine similarity of pooled backbone features).",
        ),
    ] = False,
    similarity: Annotated[
        float | None, typer.Option(help="Cosine similarity at which --near-duplicates links two images (default 0.97).")
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Scan every image: unreadable files, sizes, class balance, duplicates across and within splits.

    Exits 1 when it finds something that would break or bias training.
    """
    set_ = _with_flags(set_, locals())
    options.check_max_imbalance(max_imbalance)
    options.check_similarity(similarity, near_duplicates)
    cfg = _config(config, set_)
    _output(quiet)
    from vggft.data import check
    from vggft.reporting.plots import format_report

    if quarantine is not None:  # before the scan: nothing half-done; data.root locked from the scan to the moves
        check.check_move_destination(quarantine, cfg.data.root, "--quarantine")
    with check.moving_out(cfg.data.root, "--quarantine") if quarantine is not None else contextlib.nullcontext():
        report = check.check_data(cfg, max_imbalance=max_imbalance)
        if near_duplicates:
            from vggft.diagnostics.near_duplicates import DEFAULT_SIMILARITY, find_near_duplicates

            find_near_duplicates(cfg, report, DEFAULT_SIMILARITY if similarity is None else similarity)
        typer.echo(format_report(report))
        if quarantine is not None and report.bad:
            moved = check.quarantine(report, quarantine)
            report.bad = []  # no longer in the data
            typer.echo(f"Moved {len(moved)} unreadable file(s) to {quarantine}")
    if report.problems:
        raise typer.Exit(1)


@app.command(epilog=_examples("predict"))
@_handle_errors
def predict(
    inputs: InputsArg,
    weights: Annotated[
        Path,
        typer.Option(
            "--weights", "-w", help="Weights saved by vggft or the tutorial, or an .onnx file from vggft export."
        ),
    ] = Path("models/VGG16.pt"),
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, _set_option("train.device=cpu")] = None,
    device: DeviceFlag = None,
    topk: Annotated[int, typer.Option(help="Classes to report per image, most probable first (1 or more).")] = 5,
    csv_path: Annotated[
        Path | None,
        typer.Option(
            "--csv",
            help="Also write path,rank,class,probability,error rows here (error: why a file could not be "
            "read; its other columns empty), then novelty,novel,set (the set ;-separated).",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass (1 or more).")] = 32,
    coverage: Annotated[
        float | None,
        typer.Option(
            help="Also give each image's conformal set: the classes that hold the true one with this probability "
            "(0.50 to 0.99; averaged over images), from the sidecar's calibration."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the predictions as JSON.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Classify images with saved weights (or their ONNX export), preprocessed exactly as in training; unreadable
    files are reported. Each image gets a novelty score, flagged when unlike the training images."""
    set_ = _with_flags(set_, locals())
    options.check_predict(topk, batch_size)
    from vggft.model.conformal import check_coverage

    check_coverage(coverage)
    _output(quiet)
    from vggft.model.exported import predict as run_predict

    rows = run_predict(weights, inputs, config, set_ or [], topk=topk, batch_size=batch_size, coverage=coverage)
    if csv_path is not None:
        _write_predictions_csv(rows, csv_path)
    name_width = max([len("top-1")] + [len(t["class"]) for r in rows for t in r["top"][:1]])
    calibrated = next(
        (f"  (calibrated probabilities, temperature {r['temperature']:.3f})" for r in rows if r.get("calibrated")), ""
    )

    def line(r: dict) -> str:
        best, *others = r["top"]
        rest = "  ".join(f"{t['class']} {t['probability']:.4f}" for t in others)
        return f"{best['class']:<{name_width}}  {best['probability']:.4f}  {rest}{_trust_text(r, coverage)}".rstrip()

    _echo_rows(rows, as_json, f"{'top-1':<{name_width}}  {'prob':>6}  others{calibrated}", line)
    if csv_path is not None:
        (_err if as_json else typer.echo)(f"Wrote {csv_path}")


@app.command(epilog=_examples("explain"))
@_handle_errors
def explain(
    inputs: InputsArg,
    weights: WeightsOpt = Path("models/VGG16.pt"),
    class_name: Annotated[
        str | None, typer.Option("--class", help="Explain this class (default: the predicted one).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for <stem>.cam.png (overlay) and <stem>.cam.npy (the map).")] = Path(
        "explain"
    ),
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceFlag = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward and backward pass.")] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Grad-CAM: where in each image the network found the evidence for a class (heatmap PNG and .npy map)."""
    set_ = _with_flags(set_, locals())
    options.check_batch_size(batch_size)
    _output(quiet)
    from vggft.diagnostics.explain import explain as run_explain

    rows = run_explain(weights, inputs, config, set_ or [], class_name=class_name, out=out, batch_size=batch_size)
    _echo_rows(
        rows,
        as_json,
        f"{'class':<12}  {'prob':>6}  overlay",
        lambda r: f"{r['class']:<12}  {r['probability']:.4f}  {r['overlay']}",
    )


def _echo_rows(rows: list[dict], as_json: bool, header: str, line) -> None:
    """One row per file: JSON, or a table (path column, then ``header`` / ``line(row)``; a file that could not
    be read shows its error); then, on stderr, how many could not be read."""
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        width = max(len("path"), *(len(r["path"]) for r in rows))
        typer.echo(f"{'path':<{width}}  {header}")
        for r in rows:
            typer.echo(f"{r['path']:<{width}}  " + (f"error: {r['error']}" if "error" in r else line(r)))
    failed = sum("error" in r for r in rows)
    if failed:
        _err(f"{failed} of {len(rows)} file(s) could not be read as images")


def _trust_text(r: dict, coverage: float | None) -> str:
    """predict's set and novelty for one row: '  set 90%: a, b', '  unsure: any of a, b, c', '  NOVEL (12.3)'."""
    text = ""
    if "set" in r:
        names = ", ".join(r["set"])
        if r.get("unsure"):
            text += f"  unsure: any of {names}"
        elif not r["set"]:
            text += f"  set {coverage:.0%}: none (no class likely enough)"
        else:
            text += f"  set {coverage:.0%}: {names}"
    if "novelty" in r:
        text += f"  {'NOVEL' if r['novel'] else 'novelty'} {r['novelty']:.1f}"
    return text


def _write_predictions_csv(rows: list[dict], path: Path) -> None:
    """path,rank,class,probability,error rows; then novelty,novel,set where the weights give any of them."""
    from vggft.utils.files import save_csv

    trusted = any("novelty" in r or "set" in r for r in rows)

    def lines(r: dict) -> list[list]:
        trust = [
            f"{r['novelty']:.6g}" if "novelty" in r else "",
            str(r["novel"]).lower() if "novel" in r else "",
            ";".join(r["set"]) if "set" in r else "",
        ][: 3 if trusted else 0]
        errors = [[r["path"], "", "", "", r["error"], *trust]] if "error" in r else []
        return errors + [
            [r["path"], rank, t["class"], f"{t['probability']:.6f}", "", *trust]
            for rank, t in enumerate(r["top"], start=1)
        ]

    header = ["path", "rank", "class", "probability", "error"] + (["novelty", "novel", "set"] if trusted else [])
    save_csv(path, header, (line for r in rows for line in lines(r)))


@app.command(epilog=_examples("export"))
@_handle_errors
def export(
    weights: WeightsOpt = Path("models/VGG16.pt"),
    fmt: Annotated[
        ExportFormat | None,
        typer.Option(
            "--format",
            "-f",
            help="onnx (needs pip install onnx onnxscript onnxruntime), pt2 (torch.export), or "
            "torchscript (deprecated upstream); default: onnx when those packages are installed, else pt2.",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Output file (default: beside the weights, VGG16.onnx, VGG16.pt2 or VGG16.torchscript.pt)."),
    ] = None,
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, _set_option("data.image_size=160")] = None,
) -> None:
    """Export to ONNX, torch.export (.pt2) or TorchScript (normalised images in; logits and calibrated probabilities
    out), checked against PyTorch."""
    from vggft.model.export import TOLERANCE
    from vggft.model.export import export as run_export

    path, diff = run_export(weights, fmt.value if fmt else None, out, config, set_ or [])
    typer.echo(f"Exported {path} (max |diff| vs PyTorch: {diff:.1e}, tolerance {TOLERANCE:.0e})")


NameOpt = Annotated[str | None, typer.Option(help="Run folder name under output.runs_dir.")]


FoldsOpt = Annotated[int, typer.Option(help="Number of folds (stratified) over train+val.")]
FoldSeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the fold assignment (train.seed: --set).")]


def _wrote(folder: Path, files: list[Path]) -> None:
    typer.echo(f"Wrote {folder}/: {', '.join(p.name for p in files)}")


def _named(set_: list[str] | None, name: str | None) -> list[str]:
    return [*(set_ or []), *([f"output.name={name}"] if name else [])]


def _table(header: list[str], rows: list[list[str]], left: int = 0) -> None:
    """Columns as wide as their widest cell on a terminal (an emoji or a CJK character takes two columns);
    the first ``left`` left-aligned, the rest right-aligned."""
    from vggft.utils.text import display_width, pad

    widths = [max(display_width(h), *(display_width(r[i]) for r in rows)) for i, h in enumerate(header)]
    for line in [header, *rows]:
        typer.echo("  ".join(pad(c, w, right=i >= left) for i, (c, w) in enumerate(zip(line, widths, strict=False))))


@app.command(epilog=_examples("sweep"))
@_handle_errors
@_timed
def sweep(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, _set_option("train.epochs=10")] = None,
    data: DataFlag = None,
    epochs: EpochsFlag = None,
    lr: LrFlag = None,
    batch_size: BatchSizeFlag = None,
    image_size: ImageSizeFlag = None,
    arch: ArchFlag = None,
    weights_from: WeightsFromFlag = None,
    device: DeviceFlag = None,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            metavar="KEY=V1,V2,...",
            help="Values to try (repeatable; every combination), e.g. --grid train.lr=1e-4,1e-3,1e-2.",
        ),
    ] = None,
    range_: Annotated[
        list[str] | None,
        typer.Option(
            "--range",
            metavar="KEY=LO:HI[:log]",
            help="A range to draw from with --trials (repeatable), e.g. --range train.lr=1e-5:1e-1:log.",
        ),
    ] = None,
    trials: Annotated[
        int | None, typer.Option(help="Random search: this many seeded draws over the --range and --grid values.")
    ] = None,
    draw_seed: Annotated[int, typer.Option("--seed", help="Seed of the random draws (train.seed: --set).")] = 0,
    save_best: Annotated[
        bool, typer.Option("--save-best", help="Save the best trial's model at output.weights (no further training).")
    ] = False,
    name: NameOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Train one head per setting on the cached rows (one extraction), rank them on val, write best.yaml."""
    set_ = _with_flags(set_, locals())
    cfg = _config(config, _named(set_, name))
    _check_pretrained(cfg)
    from vggft.tuning.sweep_plan import parse_grid, parse_range, plan_trials, trial_configs

    plans = plan_trials([parse_grid(g) for g in grid or []], [parse_range(r) for r in range_ or []], trials, draw_seed)
    trial_configs(cfg, plans)  # a bad value is refused before torch is imported
    _output(quiet)
    from vggft.tuning.sweep import sweep as run_sweep

    result = run_sweep(cfg, plans, save_best=save_best)
    _echo_trials(result)
    _wrote(result.run_dir, result.files)
    typer.echo(f"Train it: vggft train --config {result.run_dir / 'best.yaml'}")
    if result.weights is not None:
        from vggft.model.weights import sidecar_path

        typer.echo(f"Saved {result.weights} (sidecar {sidecar_path(result.weights)})")


def _setting(value) -> str:
    """A trial's value of a key as sweep prints it: a float to 3 significant digits."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _echo_trials(result) -> None:
    """sweep's table of trials, best val accuracy first, then the best trial's settings."""
    rows = [
        [
            str(rank),
            str(t.number),
            *(_setting(t.values[k]) for k in result.keys),
            f"{100 * t.val_acc:.2f}%" if t.status == "ok" else t.status,
            f"{t.val_loss:.4f}" if t.status == "ok" else "-",
            str(t.epoch),
            f"{t.seconds:.1f}",
        ]
        for rank, t in enumerate(result.trials, start=1)
    ]
    _table(["rank", "trial", *result.keys, "val acc", "val loss", "epoch", "seconds"], rows)
    best = result.best
    typer.echo(
        f"Best: trial {best.number} ("
        + ", ".join(f"{k}={_setting(v)}" for k, v in best.values.items())
        + f"), val acc {100 * best.val_acc:.2f}%"
    )


@app.command("lr-find", epilog=_examples("lr-find"))
@_handle_errors
@_timed
def lr_find(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, _set_option("train.optimizer=adam")] = None,
    data: DataFlag = None,
    epochs: EpochsFlag = None,
    lr: LrFlag = None,
    batch_size: BatchSizeFlag = None,
    image_size: ImageSizeFlag = None,
    arch: ArchFlag = None,
    weights_from: WeightsFromFlag = None,
    device: DeviceFlag = None,
    seed: SeedFlag = None,
    start: Annotated[float, typer.Option(help="First learning rate.")] = 1e-7,
    end: Annotated[float, typer.Option(help="Last learning rate.")] = 10.0,
    steps: Annotated[
        int, typer.Option(help="Batches to take, 10 or more (going round the train rows as needed).")
    ] = 100,
    one_pass: Annotated[
        bool, typer.Option("--one-pass", help="One pass over the train rows instead of --steps.")
    ] = False,
    suggest: Annotated[
        str,
        typer.Option(
            metavar="<cliff|valley|steepest>",
            help="Which suggestion to print: cliff (a tenth of the lr where the loss starts to climb), or fastai's "
            "valley or steepest.",
        ),
    ] = "cliff",
    name: NameOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """The learning-rate range test on cached rows: a loss-vs-lr plot and a suggested train.lr."""
    set_ = _with_flags(set_, locals())
    options.check_lr_find(start, end, None if one_pass else steps)
    cfg = _config(config, _named(set_, name))
    _check_pretrained(cfg)
    _output(quiet)
    from vggft.tuning.lr_find import lr_find as run_lr_find

    found = run_lr_find(cfg, start=start, end=end, steps=None if one_pass else steps, suggestion=suggest)
    test = found.test
    stopped = f"; {test.stopped}" if test.stopped else ""
    typer.echo(f"Range test: {len(test.lrs)} steps, lr {start:.0e} to {test.lrs[-1]:.2e}{stopped}")
    if found.lr is None:  # exit 0 all the same: the curve (plot, CSV) is the result, and it is written
        typer.echo(f"No usable advice: {found.advice}")
    else:
        typer.echo("Suggestions: " + ", ".join(f"{n} {lr:.2e}" for n, (lr, _) in found.suggestions.items()))
        typer.echo(f"Suggested lr ({found.chosen}): {found.lr:.2g}; use it with:")
        typer.echo(f"  --set train.lr={found.lr:.2g}")
    _wrote(found.run_dir, found.files)


@app.command(epilog=_examples("kfold"))
@_handle_errors
@_timed
def kfold(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, _set_option("model.head=gap")] = None,
    data: DataFlag = None,
    epochs: EpochsFlag = None,
    lr: LrFlag = None,
    batch_size: BatchSizeFlag = None,
    image_size: ImageSizeFlag = None,
    arch: ArchFlag = None,
    weights_from: WeightsFromFlag = None,
    device: DeviceFlag = None,
    folds: FoldsOpt = 5,
    fold_seed: FoldSeedOpt = 0,
    name: NameOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Stratified k-fold cross-validation on the cached rows: accuracy per fold, mean and std, out-of-fold CSV."""
    set_ = _with_flags(set_, locals())
    options.check_folds(folds)
    cfg = _config(config, _named(set_, name))
    _check_pretrained(cfg)
    _output(quiet)
    from vggft.tuning.kfold import kfold as run_kfold

    run, folder, files = run_kfold(cfg, folds, fold_seed)
    for f in run.figures:
        typer.echo(f"fold {f['fold']}: acc@1 {100 * f['accuracy']:.2f}% ({f['correct']}/{f['images']})")
    typer.echo(
        f"mean acc@1 {100 * run.mean:.2f}% +- {100 * run.std:.2f}% (sample std over {folds} folds, "
        f"{len(run.samples)} images)"
    )
    _wrote(folder, files)


@app.command("label-issues", epilog=_examples("label-issues"))
@_handle_errors
@_timed
def label_issues(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, _set_option("data.root=path/to/images")] = None,
    data: DataFlag = None,
    epochs: EpochsFlag = None,
    lr: LrFlag = None,
    batch_size: BatchSizeFlag = None,
    image_size: ImageSizeFlag = None,
    arch: ArchFlag = None,
    weights_from: WeightsFromFlag = None,
    device: DeviceFlag = None,
    folds: FoldsOpt = 5,
    fold_seed: FoldSeedOpt = 0,
    out: Annotated[
        Path | None, typer.Option(help="Folder for the CSVs and the PNG (default: a new run folder).")
    ] = None,
    show: Annotated[int, typer.Option(help="Suspects in the grid PNG and printed (0: no grid).")] = 16,
    move: Annotated[
        Path | None, typer.Option(help="Move the suspects here for review (paths kept); deletes nothing.")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="--move even when the model is too weak to judge labels.")
    ] = False,
    undo: Annotated[
        Path | None,
        typer.Option(metavar="RUN", help="Put back what --move moved, as listed in RUN/moves.csv (nothing else runs)."),
    ] = None,
    name: NameOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Images whose label looks wrong: confident learning on k-fold out-of-fold probabilities.

    Exits 1, moving nothing, when --move is given and the model is too weak to judge labels (--force moves anyway).
    """
    if undo is not None:
        _output(quiet)
        return _undo_moves(undo, move)
    set_ = _with_flags(set_, locals())
    options.check_label_issues(folds, show)
    cfg = _config(config, _named(set_, name))
    _check_pretrained(cfg)
    _output(quiet)
    from vggft.tuning.label_issues import label_issues as find

    found = find(cfg, folds=folds, seed=fold_seed, out=out, show=show, move=move, force=force)
    _echo_label_issues(found, show, move)


def _echo_label_issues(found, show: int, move: Path | None) -> None:
    """label-issues' table and summary on stdout; a model too weak to judge labels: a warning, or (when --move
    was held back) the error."""
    from vggft.utils.logs import log

    names = found.run.data.names
    rows = [
        [found.run.samples[s.index][0], names[s.given], names[s.suggested], f"{s.confidence:.3f}"]
        for s in found.suspects[:show]
    ]
    if rows:
        _table(["path", "given", "suggested", "confidence"], rows, left=3)
    more = len(found.suspects) - len(rows)
    typer.echo(
        f"{len(found.suspects)} suspected label issue(s) among {len(found.run.samples)} images"
        + (f" ({more} more in the CSV)" if more > 0 else "")
        + f"; out-of-fold acc@1 {100 * found.run.mean:.2f}%"
    )
    _wrote(found.out, found.files)
    if found.moved:
        typer.echo(
            f"Moved {len(found.moved)} file(s) to {move} for review (paths kept relative to "
            f"{found.run.data.splits.root}; nothing deleted); vggft label-issues --undo {found.out} puts them back"
        )
    if found.held_back:
        raise VggftError(f"label-issues: {found.weak}; --move moved nothing (--force moves the suspects anyway)")
    if found.weak:
        log.warning(f"label-issues: {found.weak}")


def _undo_moves(run: Path, move: Path | None) -> None:
    """label-issues --undo RUN: the files RUN's --move moved, back where they were."""
    if move is not None:
        from vggft.utils.errors import ConfigError

        raise ConfigError("--undo: puts back what an earlier --move moved; give it without --move")
    from vggft.data.check import undo_moves
    from vggft.tuning.label_issues import MOVES_FILE
    from vggft.utils.logs import log

    record = run / MOVES_FILE if run.is_dir() else run
    back, gone = undo_moves(record)
    typer.echo(f"Put back {len(back)} file(s) listed in {record}" if back else f"Nothing to put back ({record})")
    if gone:
        log.warning(f"{gone} moved file(s) are no longer where {record} says they went (reviewed?); left as they are")


@app.command(epilog=_examples("sidecar"))
@_handle_errors
def sidecar(
    weights: WeightsOpt = Path("models/VGG16.pt"),
    accept: Annotated[
        bool, typer.Option("--accept", help="Accept a hand edit: check every field again, then record its digest.")
    ] = False,
) -> None:
    """Check the sidecar beside the weights (class names, preprocessing, temperature, its own digest)."""
    from vggft.model.weights import read_weights, reseal_sidecar, sidecar_path

    if accept:
        typer.echo(f"Accepted {reseal_sidecar(weights)}: its fields pass every check, and its digest is recorded")
        return
    saved = read_weights(weights)
    if saved.sidecar is None:
        typer.echo(f"{weights}: no sidecar beside it (the weights alone are read)")
        return
    sealed = "sealed" if "sidecar_sha256" in saved.sidecar else "from a vggft before sealing: checked field by field"
    typer.echo(f"{sidecar_path(weights)}: belongs to {weights} and passes every check ({sealed})")


@app.command(epilog=_examples("calibrate"))
@_handle_errors
def calibrate(
    weights: WeightsOpt = Path("models/VGG16.pt"),
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, _set_option("data.root=other/images")] = None,
    data: DataFlag = None,
    device: DeviceFlag = None,
    split: Annotated[Split, typer.Option(help="Which split to calibrate on (never test).")] = Split.val,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was stored as JSON.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Fit the temperature, the conformal thresholds and the novelty statistics on a split and store them in
    the sidecar (what train does with a val split), for weights trained without one."""
    set_ = _with_flags(set_, locals())
    _output(quiet)
    from vggft.diagnostics.calibrate import calibrate_weights

    stored = calibrate_weights(weights, config, set_ or [], split=split.value)
    if as_json:
        typer.echo(json.dumps(stored, indent=2))
        return
    t = stored["temperature"]
    q = stored["conformal"]["thresholds"]
    novelty = stored["novelty"]
    typer.echo(
        f"Calibrated on {stored['images']} {stored['split']} images: temperature "
        + (f"{t:.3f}" if t is not None else "none (the fit ran to the edge of its range)")
        + f"; conformal {stored['conformal']['method']} thresholds 90% {q['0.90']}, 95% {q['0.95']}"
    )
    if novelty:
        typer.echo(
            f"Novelty: {novelty['score']} on {novelty['dims']}-d penultimate rows of {stored['train_images']} train "
            f"images; threshold {novelty['threshold']} ({novelty['pass_rate']:.0%} of {stored['split']} images pass)"
        )
    typer.echo(f"Wrote {stored['sidecar']}")


@app.command("make-demo", epilog=_examples("make-demo"))
@_handle_errors
def make_demo(
    root: Annotated[Path, typer.Argument(help="Where to write the demo image folder (made if missing).")] = Path(
        "data/demo"
    ),
    train_per_class: Annotated[int, typer.Option(help="Training images per class (sea, sun).")] = 24,
    test_per_class: Annotated[int, typer.Option(help="Test images per class (sea, sun).")] = 10,
) -> None:
    """Write a small two-class image folder (train/ and test/, 64 px JPEGs) to try vggft offline."""
    options.check_demo(train_per_class, test_per_class)
    from vggft.data.demo import make_demo_data

    typer.echo(str(make_demo_data(root, train_per_class, test_per_class)))


@app.command("configs", epilog=_examples("configs"))
@_handle_errors
def configs(
    show: Annotated[
        str | None, typer.Option(metavar="PRESET", help="Print that preset (a YAML file to copy and edit).")
    ] = None,
    defaults: Annotated[
        bool,
        typer.Option(
            "--defaults", help="Print every key with its default and what it means (a config file to start from)."
        ),
    ] = False,
) -> None:
    """The shipped presets (use one with --config NAME), one of them in full, or every key's default."""
    from vggft.config import presets, reference
    from vggft.utils.errors import ConfigError

    if show is not None and defaults:
        raise ConfigError("--show and --defaults: give one of them")
    if show is not None:
        path = presets.find(show)
        if path is None:
            raise ConfigError(f"--show: no preset '{show}'; the presets are {', '.join(presets.names())}")
        typer.echo(path.read_text(encoding="utf-8"), nl=False)
        return
    if defaults:
        typer.echo(reference.defaults_yaml(), nl=False)
        return
    width = max(len(name) for name in presets.names())
    for name in presets.names():
        typer.echo(f"{name:<{width}}  {presets.description(name)}")
    typer.echo("Use one with --config NAME; print it with vggft configs --show NAME; every key: --defaults")


class RunKind(str, Enum):
    train = "train"
    sweep = "sweep"
    kfold = "kfold"
    label_issues = "label_issues"
    lr_find = "lr_find"


EXAMPLES["runs"] = ["vggft runs", "vggft runs --sort -test_acc --kind train", "vggft runs --json > runs.json"]


@app.command("runs", epilog=_examples("runs"))
@_handle_errors
def runs(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, _set_option("output.runs_dir=other/runs")] = None,
    sort: Annotated[
        str | None,
        typer.Option(metavar="[-]COLUMN", help="Sort by this column of the table (-COLUMN: descending); default date."),
    ] = None,
    kind: Annotated[RunKind | None, typer.Option(help="Only the runs of this command.")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print every run, with its results and config, as JSON.")
    ] = False,
) -> None:
    """The runs under output.runs_dir as a table: settings that differ, val and test acc@1, seconds."""
    cfg = _config(config, set_)
    from vggft.reporting.runs import list_runs, table

    listing = list_runs(cfg.output.runs_dir, kind=kind.value if kind else None, sort=sort)
    for broken in listing.broken:
        _err(f"{broken.path}: not listed: {broken.reason}")
    if as_json:
        typer.echo(json.dumps(listing.to_dict(), indent=2, default=str))
    elif listing.rows:
        header, rows = table(listing)
        _table(header, rows, left=6)
    else:
        _err(f"No runs in {listing.runs_dir}" + (f" of kind {kind.value}" if kind else ""))


def run() -> None:
    """Console-script entry point."""
    try:
        app(prog_name="vggft")
    finally:
        # Whatever is alive now is freed by the OS when the process ends: the collector need not walk the
        # millions of objects torch's modules hold once more on the way out (0.5 s of a 3 s command here).
        gc.freeze()


if __name__ == "__main__":  # pragma: no cover
    run()
    sys.exit(0)
