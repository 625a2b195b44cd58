"""Trained weights and their sidecar, written as one unit: the weights first, then the sidecar, which records
the weights' SHA-256; loading checks it, so a crash between the two renames is caught, never mislabelled.
The sidecar vouches for itself too: ``sidecar_sha256`` is the SHA-256 of its own content (which holds the
weights' digest), so a hand edit is named as one; ``reseal_sidecar`` accepts an intended edit. Every field is
range-checked on every load, sealed or not. The format versions read here keep older files loadable."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import reprlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vggft import __version__
from vggft.config.loading import config_from_dict, migrate_config
from vggft.config.schema import Config
from vggft.model.build import describe_state_dict
from vggft.model.checkpoints import (
    CHECKPOINT_FORMAT,
    LIGHT_KIND,
    checked_checkpoint,
    rebuild_from_checkpoint,
    trainable_state,
)
from vggft.model.fingerprint import frozen_fingerprint
from vggft.model.safe_load import check_weights_file, read_state_dict
from vggft.utils.errors import ConfigError, OutputError, WeightsError
from vggft.utils.files import check_name_length, existing_parent, file_digest, save_json, save_torch

WEIGHTS_FORMAT = "vggft-weights/2"


# Formats this version reads: 1 (vggft 0.1: no digest, split in a separate manifest file) and 2.
READABLE_WEIGHTS = ("vggft-weights/1", WEIGHTS_FORMAT)

# The sidecar's digest of its own content. A sidecar without it (written before vggft sealed them) is read as
# before, range checks and all.
SEAL_KEY = "sidecar_sha256"

# The temperatures a sidecar may hold: the calibration fit's search range (training.calibration.LOG_T_RANGE),
# so every temperature vggft train stores lies inside, and softmax(logits / T) stays finite.
TEMPERATURE_RANGE = (1e-3, 1e3)
PRECISIONS = ("fp32", "bf16", "fp16")  # what train.amp resolved to (utils.device.PRECISION's names)


def sidecar_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def check_writable(path: Path) -> None:
    """Fail before any work if the output cannot be written (creating nothing yet)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output.weights: '{path}' is a folder; give a file path such as models/VGG16.pt")
    if path.suffix.lower() == ".json":
        raise OutputError(
            f"output.weights: '{path}' ends in .json, the name of its own sidecar; "
            "give the weights a .pt name such as models/VGG16.pt"
        )
    check_name_length(path, "output.weights", spare=max(0, len(".json") - len(path.suffix)))  # and its sidecar
    existing = existing_parent(path.parent)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(
            f"output.weights: cannot write to '{path.parent}' ('{existing}' is not a writable folder); "
            "choose another path with --set output.weights=PATH"
        )


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors: loadable by plain torchvision code on any machine."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_trained(
    model: nn.Module,
    weights: Path,
    cfg: Config,
    class_names: list[str],
    *,
    metrics: dict | None = None,
    split: dict | None = None,
    temperature: float | None = None,
    trainable: dict[str, torch.Tensor] | None = None,
    frozen: str | None = None,
    trust: TrustRecord | None = None,
    precision: str = "fp32",
) -> Path:
    """Write the weights, then the sidecar that records their digest (and a pool's ``split``, the softmax
    ``temperature`` fitted on val, if any, and the ``precision`` trained in), each atomically. With
    ``output.full_weights: false`` the weights file holds the ``trainable`` tensors and the ``frozen`` part's
    fingerprint only (``light_body``).

    A kill between the two renames leaves new weights beside the old sidecar: its digest no longer
    matches, and loading says so instead of naming the classes wrongly.
    """
    from vggft.data.transforms import preprocessing

    weights = Path(weights)
    body = (
        plain_state_dict(model) if cfg.output.full_weights else light_body(model, cfg, class_names, trainable, frozen)
    )
    digest = save_torch(body, weights, sha256=True)
    config = cfg.to_dict()
    config["data"]["root"] = str(Path(cfg.data.root).resolve())  # usable from any working folder
    sidecar = {
        "format": WEIGHTS_FORMAT,
        "vggft_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "weights_file": weights.name,
        "weights_sha256": digest,
        "arch": cfg.model.arch,
        "head": cfg.model.head,
        "num_classes": cfg.model.num_classes or len(class_names),
        "class_names": class_names,
        **preprocessing(cfg.data),
        "split": split,
        "precision": precision,
        "temperature": temperature,
        **trust_fields(weights, trust),
        "config": config,
        "metrics": metrics or {},
    }
    path = sidecar_path(weights)
    save_json(sealed(sidecar), path)
    return path


@dataclass
class TrustRecord:
    """What tells when not to trust an answer: the conformal thresholds (``model.conformal.fit_conformal``), the
    novelty record (``score``, ``threshold``, ...) and its statistics (Mahalanobis tensors), or None each."""

    conformal: dict | None
    novelty: dict | None
    stats: dict[str, torch.Tensor] | None = None


def novelty_path(weights: Path) -> Path:
    """Where the novelty statistics of ``weights`` live: VGG16.pt -> VGG16.novelty.pt."""
    return Path(weights).with_suffix(".novelty.pt")


def trust_fields(weights: Path, trust: TrustRecord | None) -> dict:
    """The sidecar's ``conformal`` and ``novelty`` fields; writes the statistics file first (its name and
    SHA-256 go into the novelty record, so the sealed sidecar vouches for it)."""
    if trust is None:
        return {"conformal": None, "novelty": None}
    novelty = dict(trust.novelty) if trust.novelty else None
    if novelty is not None and trust.stats is not None:
        path = novelty_path(weights)
        stats = {key: value.detach().float().cpu().contiguous() for key, value in trust.stats.items()}
        digest = save_torch(stats, path, sha256=True)
        novelty.update(stats_file=path.name, stats_sha256=digest)
    return {"conformal": trust.conformal, "novelty": novelty}


def store_trust(weights: Path, temperature: float | None, trust: TrustRecord) -> Path:
    """Write ``trust`` (and ``temperature``) into the sidecar of ``weights`` (checked as every load does) and
    seal it again: what ``vggft calibrate`` does. Returns the sidecar's path."""
    weights = Path(weights)
    read_weights(weights)  # the sidecar as it is must pass every check, its seal included
    path = sidecar_path(weights)
    body = _read_body(path)
    body.update(temperature=temperature, **trust_fields(weights, trust))
    check_sidecar(sealed(body), weights)
    save_json(sealed(body), path)
    return path


def read_novelty_stats(weights: Path, sidecar: dict | None) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """(the novelty statistics, None), or (None, what is missing) for weights without them. A file that is there
    but is not the one the sidecar records is an error."""
    record = (sidecar or {}).get("novelty")
    if not record:
        return None, "no novelty statistics (weights trained without a val split, or before vggft kept them)"
    if "stats_file" not in record:
        return None, None
    path = Path(weights).parent / record["stats_file"]
    if not path.is_file():
        return None, f"no novelty statistics: {path} is missing"
    if file_digest(path) != record.get("stats_sha256"):
        raise WeightsError(
            f"{path}: not the novelty statistics the sidecar of '{weights}' records (their SHA-256 differs); "
            f"run vggft calibrate -w {weights} to write them again"
        )
    try:
        stats = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is one line
        raise WeightsError(f"{path}: unreadable novelty statistics ({type(err).__name__})") from None
    return stats, None


def sidecar_digest(body: dict) -> str:
    """SHA-256 of a sidecar's content less its own digest: canonical JSON (sorted keys, no spaces, UTF-8), so a
    re-indented file is the same sidecar. It covers weights_sha256, which binds it to the weights."""
    content = {key: value for key, value in body.items() if key != SEAL_KEY}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def sealed(body: dict) -> dict:
    """``body`` as its file will read back (JSON types), with its digest (``SEAL_KEY``) last."""
    plain = json.loads(json.dumps({key: value for key, value in body.items() if key != SEAL_KEY}, default=str))
    return {**plain, SEAL_KEY: sidecar_digest(plain)}


def accept_hint(weights: Path) -> str:
    """How to accept an intended edit of the sidecar of ``weights``."""
    return f"vggft sidecar --accept -w {weights}"


def reseal_sidecar(weights: Path) -> Path:
    """Accept a hand edit of the sidecar of ``weights``: check it as every load does (each field, and against
    these very weights), then record the digest of what it now says. Returns the sidecar's path."""
    weights = Path(weights)
    path = sidecar_path(weights)
    if not path.is_file():
        raise WeightsError(f"{path}: no sidecar beside '{weights}' to accept; train again to write one")
    saved = read_weights(weights, check_seal=False)  # every check a load makes but the seal's
    if saved.sidecar is None or "format" not in saved.sidecar:
        raise WeightsError(
            f"--weights: '{weights}' is a run checkpoint, which holds its class names and config itself; nothing "
            "to accept: pass the weights that vggft train saved (output.weights)"
        )
    body = _read_body(path)  # as on disk: no renamed keys moved, no split manifest read in
    body.setdefault("weights_sha256", file_digest(weights))
    save_json(sealed(body), path)
    return path


def light_body(
    model: nn.Module, cfg: Config, class_names: list[str], trainable: dict | None, frozen: str | None
) -> dict:
    """What training changed (``trainable``, by default every parameter that learns) and the fingerprint of
    the rest (``frozen``), with the config that rebuilds the rest from model.weights: a checkpoint of its own
    kind, read like a run's best.pt."""
    trainable = trainable if trainable is not None else trainable_state(model)
    return {
        "format": CHECKPOINT_FORMAT,
        "vggft_version": __version__,
        "kind": LIGHT_KIND,
        "config": cfg.to_dict(),
        "class_names": class_names,
        "base_weights": cfg.model.weights,  # where the frozen part comes from: a torchvision name or a file
        "frozen_fingerprint": frozen or frozen_fingerprint(model, trainable),
        "model": trainable,
    }


def read_sidecar(weights: Path, outputs: int | None = None, *, check_seal: bool = True) -> dict | None:
    """The sidecar of ``weights`` (None if there is none), checked to belong to these very weights (whose head
    has ``outputs`` outputs, if known), each field in range, and (``check_seal``) not edited by hand."""
    path = sidecar_path(weights)
    if not path.is_file():
        return None
    body = _read_body(path)
    expected = body.get("weights_sha256")
    if expected and file_digest(weights) != expected:
        raise WeightsError(
            f"{path}: belongs to other weights than '{weights}' (their SHA-256 differs: the files come from "
            "different runs, or a save was cut short); train again, or delete the sidecar to use the weights alone"
        )
    check_sidecar(body, weights, outputs)
    if check_seal and SEAL_KEY in body and body[SEAL_KEY] != sidecar_digest(body):
        raise WeightsError(
            f"{path}: edited by hand since vggft wrote it (its {SEAL_KEY} no longer matches what it says); "
            f"undo the edit, or accept it: {accept_hint(weights)}"
        )
    body["config"] = migrate_config(body["config"])
    if body["format"] == "vggft-weights/1":
        body["split"] = _legacy_split(weights, body.get("split_manifest"))
    return body


def _read_body(path: Path) -> dict:
    """A sidecar file's JSON, as written: a vggft sidecar of a format this version reads."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path}: unreadable sidecar ({err}); delete it to evaluate the weights alone") from None
    if not isinstance(body, dict) or "class_names" not in body or "config" not in body:
        raise WeightsError(f"{path}: not a vggft sidecar (no class_names/config); move it away or delete it")
    fmt = body.get("format")
    if fmt not in READABLE_WEIGHTS:
        raise WeightsError(
            f"{path}: sidecar format '{fmt}' is newer than this vggft {__version__} reads "
            f"({', '.join(READABLE_WEIGHTS)}); upgrade vggft"
        )
    return body


def check_sidecar(body: dict, weights: Path, outputs: int | None = None) -> None:
    """Each field a load uses, in range (one line naming the file, the field and its value): the temperature,
    the class names (distinct, one per output of the head), the config and the preprocessing it records."""
    path = sidecar_path(weights)
    check_temperature(body.get("temperature"), path)
    if body.get("precision", "fp32") not in PRECISIONS:  # absent: written before vggft recorded it
        raise WeightsError(
            f"{path}: precision {reprlib.repr(body['precision'])} is not one of {', '.join(PRECISIONS)}; "
            "undo the edit, or train again"
        )
    names = _check_names(body["class_names"], path)
    check_trust(body, path)
    try:
        cfg = config_from_dict(migrate_config(copy.deepcopy(body["config"])), f"{path}: config")
    except ConfigError as err:
        raise WeightsError(f"{err}; undo the edit, or train again") from None
    _check_preprocessing(body, cfg, path)
    _check_outputs(body, names, cfg, weights, outputs)


def check_temperature(value: object, path: Path) -> None:
    """None (no temperature fitted) or a number in TEMPERATURE_RANGE."""
    low, high = TEMPERATURE_RANGE
    if value is None:
        return
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high):
        raise WeightsError(
            f"{path}: temperature {value!r} is not a number from {low:g} to {high:g} (the range vggft fits it in); "
            "train again, or remove the temperature key to use uncalibrated probabilities"
        )


def _number(value: object, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def check_trust(body: dict, path: Path, *, stats_in_graph: bool = False) -> None:
    """``conformal``: a known score, a count, and a threshold in [0, 1] (or null: every class) per known
    coverage level; ``novelty``: a known score, a pass rate in (0, 1), a finite threshold (or null), and for
    Mahalanobis the statistics file's name and SHA-256 (``stats_in_graph``, an exported file's record: none,
    the statistics are constants of its graph)."""
    from vggft.model.conformal import COVERAGE_LEVELS, METHODS, level_key

    fix = "undo the edit, or run vggft calibrate again"
    conformal, novelty = body.get("conformal"), body.get("novelty")
    if conformal is not None:
        levels = {level_key(c) for c in COVERAGE_LEVELS}
        thresholds = conformal.get("thresholds") if isinstance(conformal, dict) else None
        if (
            not isinstance(thresholds, dict)
            or conformal.get("method") not in METHODS
            or not _number(conformal.get("count"), 1, float("inf"))
            or not set(thresholds) <= levels
            or not all(v is None or _number(v, 0.0, 1.0 + 1e-6) for v in thresholds.values())
        ):
            raise WeightsError(f"{path}: conformal {reprlib.repr(conformal)} is not a conformal calibration; {fix}")
    if novelty is not None and not _novelty_ok(novelty, stats_in_graph):
        raise WeightsError(f"{path}: novelty {reprlib.repr(novelty)} is not a novelty record; {fix}")


def _novelty_ok(novelty: object, stats_in_graph: bool) -> bool:
    from vggft.model.novelty import SCORES

    if not isinstance(novelty, dict):
        return False
    threshold, stats_file = novelty.get("threshold"), novelty.get("stats_file")
    if stats_in_graph:
        if stats_file is not None:
            return False
    elif novelty.get("score") == "mahalanobis" and not (
        isinstance(stats_file, str) and stats_file and Path(stats_file).name == stats_file
    ):
        return False
    return (
        novelty.get("score") in SCORES
        and _number(novelty.get("pass_rate"), 1e-9, 1 - 1e-9)
        and (threshold is None or _number(threshold, -1e30, 1e30))
        and (stats_file is None or isinstance(novelty.get("stats_sha256"), str))
    )


def _check_names(names: object, path: Path) -> list[str]:
    """Distinct, non-empty strings."""
    fix = "undo the edit, or train again"
    if not isinstance(names, list) or not names:
        raise WeightsError(f"{path}: class_names is {reprlib.repr(names)}, not a list of names; {fix}")
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not name:
            raise WeightsError(f"{path}: class_names holds {reprlib.repr(name)}, not a class name; {fix}")
        if name in seen:
            raise WeightsError(f"{path}: class_names names {name!r} twice; {fix}")
        seen.add(name)
    return names


def _check_preprocessing(body: dict, cfg: Config, path: Path) -> None:
    """The eval transform recorded beside the config (image_size, resize, normalize, mean, std) is the config's:
    vggft preprocesses as the config says, so a top-level value that disagrees would mislead a reader."""
    from vggft.data.transforms import preprocessing

    for key, value in preprocessing(cfg.data).items():
        if key in body and body[key] != value:
            raise WeightsError(
                f"{path}: {key} {body[key]!r} disagrees with the config's {value!r} (config.data, which the eval "
                "transform follows); undo the edit, or make the two agree"
            )


def _check_outputs(body: dict, names: list[str], cfg: Config, weights: Path, outputs: int | None) -> None:
    """num_classes is the head's; one class name per output (fewer only where model.num_classes asked for a
    larger head: its spare outputs are unused_K)."""
    path, declared = sidecar_path(weights), body.get("num_classes")
    if declared is not None and (isinstance(declared, bool) or not isinstance(declared, int) or declared < 1):
        raise WeightsError(f"{path}: num_classes {declared!r} is not a count of classes; undo the edit, or train again")
    if outputs is not None and declared is not None and declared != outputs:
        raise WeightsError(
            f"{path}: describes a {declared}-class model but '{weights}' has a {outputs}-class head (the files come "
            "from different runs, or a save was cut short); train again, or delete the sidecar to evaluate the "
            "weights alone"
        )
    heads = outputs if outputs is not None else declared
    if heads is None or len(names) == heads or (len(names) < heads and cfg.model.num_classes == heads):
        return
    count = f"{len(names)} name{'s' if len(names) != 1 else ''}"
    raise WeightsError(
        f"{path}: class_names has {count} for the {heads} outputs of the head of '{weights}' (one name per output); "
        "undo the edit, or train again"
    )


def _rebuild_light(body: dict, weights: Path) -> nn.Module:
    """The whole network of weights saved with output.full_weights: false; what is missing, in one line."""
    try:
        return rebuild_from_checkpoint(body, weights, "--weights")
    except WeightsError as err:
        raise WeightsError(
            f"--weights: '{weights}' holds the trained layers only (output.full_weights: false), the rest comes "
            f"from model.weights '{body.get('base_weights')}': {err}"
        ) from None


def _legacy_split(weights: Path, manifest: str | None) -> dict | None:
    """Format 1 kept a pool's split in a file beside the weights."""
    if not manifest:
        return None
    path = Path(weights).parent / manifest
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path}: unreadable split manifest ({err}); delete it to split the pool afresh") from None


@dataclass
class SavedWeights:
    """A full state_dict with what vggft recorded about it (``sidecar`` None for a bare state_dict)."""

    state_dict: dict[str, torch.Tensor]
    sidecar: dict | None
    path: Path

    @property
    def split(self) -> dict | None:
        return self.sidecar.get("split") if self.sidecar else None


def read_weights(weights: Path, *, check_seal: bool = True) -> SavedWeights:
    """A weights file with its sidecar (each field checked; ``check_seal``: and not edited by hand), or a run's
    last.pt/best.pt rebuilt into full weights."""
    weights = Path(weights)
    check_weights_file(weights, "--weights", "pass the .pt file that vggft train saved")
    state_dict = read_state_dict(weights, "--weights")
    if "format" in state_dict:  # read_state_dict returns a run checkpoint whole
        body = checked_checkpoint(state_dict, weights, "--weights")
        if body.get("kind") == LIGHT_KIND:
            full = plain_state_dict(_rebuild_light(body, weights))
            return SavedWeights(full, read_sidecar(weights, _head_outputs(full), check_seal=check_seal), weights)
        model = rebuild_from_checkpoint(body, weights, "--weights")
        sidecar = {"class_names": body["class_names"], "config": body["config"], "split": body.get("split")}
        return SavedWeights(plain_state_dict(model), sidecar, weights)
    return SavedWeights(state_dict, read_sidecar(weights, _head_outputs(state_dict), check_seal=check_seal), weights)


def _head_outputs(state_dict: dict[str, torch.Tensor]) -> int | None:
    """The number of outputs of a VGG state_dict's head (None: no VGG; loading says so in its own words)."""
    try:
        return describe_state_dict(state_dict)[2]
    except (WeightsError, KeyError, IndexError):
        return None
