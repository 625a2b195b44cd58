"""The ``vggft`` command: parses, calls the library, prints. Errors become one line and an exit code here."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import Interrupted, VggftError

app = typer.Typer(
    help="Fine-tune ImageNet-pretrained VGG networks on a folder of labelled images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (see configs/).")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a config key, e.g. --set train.epochs=1."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


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


def _rank() -> int:
    from .distributed import environment_rank

    return environment_rank()


def _config(config: Path | None, overrides: list[str] | None):
    """The config, checked before torch is imported: a typo costs milliseconds, not seconds."""
    from .config import load_config

    return load_config(config, overrides or [])


def _output(quiet: bool) -> None:
    """Notes and progress go to stderr; stdout carries the command's result alone."""
    from .logs import configure

    configure(progress=not quiet)


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"vggft {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", callback=_print_version,
                                          is_eager=True)] = False,
) -> None:
    _state["debug"] = debug
    if hasattr(sys.stdout, "reconfigure"):  # a file name that is not UTF-8 is printed as its bytes, as ls does
        sys.stdout.reconfigure(errors="surrogateescape")


@app.command()
@_handle_errors
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    name: Annotated[Optional[str], typer.Option(help="Run folder name under output.runs_dir.")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Go on from a run's last.pt (its config, --set on top).")] = None,
    nproc: Annotated[int, typer.Option(help="Processes to train with (torch.distributed.run on this machine).")] = 1,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune: frozen backbone, new head; evaluate on test; save weights, sidecar and a run folder."""
    overrides = [*(set_ or []), *([f"output.name={name}"] if name else [])]
    if resume:
        if config is not None:
            from .errors import ConfigError

            raise ConfigError(f"--config {config}: a resumed run goes on with its own config (in its last.pt); "
                              "drop --config, or start a new run with it")
        from .config import resume_overrides_refused

        resume_overrides_refused(set_ or [])  # before torch is imported
        from .train import resume_config

        cfg = resume_config(resume, set_ or [])
    else:
        cfg = _config(config, overrides)
    _output(quiet)
    if nproc != 1:
        from .launch import launch_train

        args = [*(["--config", str(config)] if config else []), *[a for v in set_ or [] for a in ("--set", v)],
                *(["--name", name] if name else []), *(["--resume", str(resume)] if resume else []),
                *(["--quiet"] if quiet else [])]
        raise typer.Exit(launch_train(nproc, args, debug=_state["debug"]))  # the config is valid
    from .train import RUN_FILES, fit

    result = fit(cfg, resume=resume)
    if _rank() == 0:
        if result.test is not None:
            typer.echo(f"Test: {result.test.summary_line()}")
        typer.echo(f"Saved {result.weights} (sidecar {result.sidecar}); run folder {result.run_dir}: {RUN_FILES}")


@app.command("eval")
@_handle_errors
def eval_(
    weights: Annotated[Path, typer.Option("--weights", "-w", help="Weights saved by vggft or the tutorial.")] = Path(
        "models/VGG16.pt"
    ),
    config: ConfigOpt = None,
    set_: SetOpt = None,
    split: Annotated[str, typer.Option(help="Which split to score: test or val.")] = "test",
    topk: Annotated[int, typer.Option(help="Also report acc@k for this k.")] = 5,
    misclassified: Annotated[int, typer.Option(help="Save a grid of the N most confident mistakes.")] = 0,
    plots: Annotated[Optional[Path], typer.Option(help="Folder for the PNGs (default: beside the weights).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """acc@1 and acc@k over every image of the test split, per-class precision/recall/F1, confusion matrix."""
    _output(quiet)
    from .evaluate import evaluate_weights

    metrics, _, written = evaluate_weights(weights, config, set_ or [], split=split, topk=topk,
                                           misclassified=misclassified, plots_dir=plots)
    if as_json:
        typer.echo(json.dumps({**metrics.to_dict(), "files": [str(p) for p in written]}, indent=2))
        return
    typer.echo(metrics.summary_line())
    k = max(metrics.topk_correct)
    if k > 1:
        typer.echo(f"acc@{k} {100 * metrics.topk_correct[k] / max(metrics.total, 1):.2f}% "
                   f"({metrics.topk_correct[k]}/{metrics.total})")
    rows = metrics.per_class()
    width = max(len("class"), *(len(r["class"]) for r in rows))
    typer.echo(f"{'class':<{width}}  {'images':>7}  {'correct':>7}  {'accuracy':>8}  {'precision':>9}  {'f1':>6}")
    for r in rows:
        typer.echo(f"{r['class']:<{width}}  {r['support']:>7}  {r['correct']:>7}  {100 * r['accuracy']:>7.2f}%"
                   f"  {100 * r['precision']:>8.2f}%  {r['f1']:>6.3f}")
    typer.echo("Confusion matrix (rows: true class)")
    typer.echo(metrics.confusion_table())
    for path in written:
        typer.echo(f"Wrote {path}")


@app.command()
@_handle_errors
def summary(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Classes of the new head (default: model.num_classes or 2).")] = None,
) -> None:
    """The torchinfo table of the model as configured; needs no data and no weights file."""
    from .preview import summary as model_summary

    typer.echo(str(model_summary(_config(config, set_), num_classes)))


@app.command("show-batch")
@_handle_errors
def show_batch(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    split: Annotated[str, typer.Option(help="train, val or test.")] = "train",
    out: Annotated[Optional[Path], typer.Option(help="PNG path (default: beside output.weights).")] = None,
    count: Annotated[Optional[int], typer.Option(help="Images in the grid (default: data.batch_size).")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Save a PNG grid of one batch, de-normalised to real colours, titled with class names."""
    cfg = _config(config, set_)
    _output(quiet)
    from .preview import show_batch as save_batch

    path = save_batch(cfg, split=split, out=out, count=count)
    typer.echo(str(path))


@app.command("check-data")
@_handle_errors
def check_data(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quarantine: Annotated[Optional[Path], typer.Option(help="Move unreadable files here (paths kept); deletes nothing.")] = None,
    max_imbalance: Annotated[float, typer.Option(help="Largest/smallest class ratio that counts as a problem.")] = 10.0,
    quiet: QuietOpt = False,
) -> None:
    """Scan every image: unreadable files, sizes, class balance, duplicates across and within splits.

    Exits 1 when it finds something that would break or bias training.
    """
    cfg = _config(config, set_)
    _output(quiet)
    from .data import check
    from .reports import format_report

    report = check.check_data(cfg, max_imbalance=max_imbalance)
    typer.echo(format_report(report))
    if quarantine is not None and report.bad:
        moved = check.quarantine(report, quarantine)
        report.bad = []  # no longer in the data
        typer.echo(f"Moved {len(moved)} unreadable file(s) to {quarantine}")
    if report.problems:
        raise typer.Exit(1)


@app.command()
@_handle_errors
def predict(
    inputs: Annotated[list[Path], typer.Argument(metavar="IMAGE_OR_DIR", help="Image files and/or folders "
                                                 "(searched recursively, hidden files skipped).")],
    weights: Annotated[Path, typer.Option("--weights", "-w", help="Weights saved by vggft or the tutorial.")] = Path(
        "models/VGG16.pt"
    ),
    config: ConfigOpt = None,
    set_: SetOpt = None,
    topk: Annotated[int, typer.Option(help="Classes to report per image, most probable first.")] = 5,
    csv_path: Annotated[
        Optional[Path], typer.Option("--csv", help="Also write path,rank,class,probability rows here.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="Print the predictions as JSON.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Classify images with saved weights, preprocessed exactly as in training; unreadable files are reported."""
    _output(quiet)
    from .inference import predict as run_predict

    rows = run_predict(weights, inputs, config, set_ or [], topk=topk, batch_size=batch_size)
    if csv_path is not None:
        _write_predictions_csv(rows, csv_path)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        width = max(len("path"), *(len(r["path"]) for r in rows))
        name_width = max([len("top-1")] + [len(t["class"]) for r in rows for t in r["top"][:1]])
        typer.echo(f"{'path':<{width}}  {'top-1':<{name_width}}  {'prob':>6}  others")
        for r in rows:
            if "error" in r:
                typer.echo(f"{r['path']:<{width}}  error: {r['error']}")
                continue
            best, *others = r["top"]
            rest = "  ".join(f"{t['class']} {t['probability']:.4f}" for t in others)
            line = f"{r['path']:<{width}}  {best['class']:<{name_width}}  {best['probability']:.4f}  {rest}"
            typer.echo(line.rstrip())
    say = _err if as_json else typer.echo
    failed = sum("error" in r for r in rows)
    if failed:
        _err(f"{failed} of {len(rows)} file(s) could not be read as images")
    if csv_path is not None:
        say(f"Wrote {csv_path}")


def _write_predictions_csv(rows: list[dict], path: Path) -> None:
    import csv

    from .files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8",
                                           errors="surrogateescape") as handle:  # a path's own bytes
        writer = csv.writer(handle)
        writer.writerow(["path", "rank", "class", "probability", "error"])
        for r in rows:
            if "error" in r:
                writer.writerow([r["path"], "", "", "", r["error"]])
            for rank, t in enumerate(r["top"], start=1):
                writer.writerow([r["path"], rank, t["class"], f"{t['probability']:.6f}", ""])


@app.command()
@_handle_errors
def export(
    weights: Annotated[Path, typer.Option("--weights", "-w", help="Weights saved by vggft or the tutorial.")] = Path(
        "models/VGG16.pt"
    ),
    fmt: Annotated[str, typer.Option("--format", "-f", help="torchscript, or onnx (pip install onnx onnxscript "
                                     "onnxruntime).")] = "torchscript",
    out: Annotated[Optional[Path], typer.Option(help="Output file (default: beside the weights, "
                                                "VGG16.torchscript.pt or VGG16.onnx).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Export to TorchScript or ONNX (batch of normalised images in, logits out), checked against PyTorch."""
    from .export import TOLERANCE
    from .export import export as run_export

    path, diff = run_export(weights, fmt, out, config, set_ or [])
    typer.echo(f"Exported {path} (max |diff| vs PyTorch: {diff:.1e}, tolerance {TOLERANCE:.0e})")


@app.command("make-demo")
@_handle_errors
def make_demo(
    root: Annotated[Path, typer.Argument(help="Where to write the demo image folder.")] = Path("data/demo"),
    train_per_class: int = 24,
    test_per_class: int = 10,
) -> None:
    """Write a small two-class image folder (train/ and test/) to try vggft offline."""
    from .demo import make_demo_data

    typer.echo(str(make_demo_data(root, train_per_class, test_per_class)))


def run() -> None:
    """Console-script entry point."""
    app(prog_name="vggft")


if __name__ == "__main__":  # pragma: no cover
    run()
    sys.exit(0)
