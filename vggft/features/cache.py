"""The exact feature cache: run the frozen prefix once per image, keep its output on disk.

With a frozen backbone and a deterministic transform, every epoch recomputes the same prefix
outputs. ``FeatureCache`` stores them in a folder named by everything that decides them (the
prefix's weights and layers, the cut, the transform, the precision); inside, one row per image
keyed by the file's path, size, times and inode, so a changed image invalidates only its own row.

Storage is append-only: each extraction writes a new shard file (atomically) and its key index, which
records the shard's SHA-256 and size; a run reads only the shards that hold rows it needs. A shard whose
bytes differ from that digest, or that fails to load or does not add up (row count, width, finite float32),
is deleted and its rows extracted again.

When a shard is verified (``verify_shard``): before its rows are used, by every process that reads it. A
FeatureCache reads each shard it needs once, and a process holds one cache per command, so each run hashes
the shards it reads; a memo keyed by the file's path, size, mtime, ctime, inode and the recorded digest only
spares a second cache in the same process (fit called in a loop) from hashing again. No memo across processes
keyed by size and mtime: the hash costs less than the read it guards, a size and mtime check misses an edit
in place that puts the mtime back, and only a full hash catches damage that leaves every time alone (a bad
block, a bit flipped below the file system).
scripts/bench_shard_check.py, 20,000 rows in 20 shards, 2-core AMD EPYC, torch 2.14.1, CPU, page cache warm:
4096-wide rows (classifier6, 313 MiB) hash in 0.20 s, 0.72x the map and finiteness check every read already
did (0.28 s) and 1.6 % of one epoch's forward of the head over them (12.7 s); 512-wide rows (gap, 40 MiB) in
0.026 s (0.27x). SHA-256 (1.5 GiB/s here; SHA-1 1.6, CRC32 3.1) is what the project's other files record, and
``save_torch`` hashes it on a thread while the shard's fsync runs.

Shards written before digests were recorded (a ``.keys`` index of keys alone, or none) are checked as before
and their digest recorded then (trust on first use): re-extracting every cache once would cost a cold run
(326 s for 20,000 images at 64 px on this CPU) to guard against damage done before the upgrade.

``FeatureSource`` decides, for one model and config, whether the loop trains on cached rows (the
suffix after the frozen prefix) or on decoded images (the whole network), and says why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from vggft.config.schema import Config
from vggft.data.decode import TensorDecoder, device_batches, draft_target, resolve_decode
from vggft.data.loaders import ImageList
from vggft.data.transforms import eval_transform, train_transform, transform_signature
from vggft.features.fingerprints import holds_every_tensor, memoised
from vggft.features.rows import RowDataset, Rows
from vggft.model.build import split_frozen_prefix
from vggft.model.fingerprint import fingerprint
from vggft.utils.device import autocast_factory, extraction_layout, resolve_workers
from vggft.utils.distributed import SINGLE, Group
from vggft.utils.errors import ConfigError, Interrupted, OutputError, first_line
from vggft.utils.files import cache_root, file_identity, save_json, save_text, save_torch
from vggft.utils.logs import Counter, log

SHARD_ROWS = 1024  # write a shard at least this often, so an interrupted extraction keeps its work
SHARD_HASH = "sha256"  # the digest a shard's index records (first line: sha256:<hex>:<size>)
_verified: set[tuple] = set()  # (path, size, mtime, ctime, inode, digest) of shards this process has hashed


def file_key(path: str) -> str:
    """A row's key: the file's absolute path and ``files.file_identity`` (size, times, inode), hashed."""
    identity = "|".join([os.path.abspath(path), *map(str, file_identity(path))])
    return hashlib.sha1(identity.encode("utf-8", "surrogateescape")).hexdigest()


def module_fingerprint(module: nn.Module, weights: str | None = None) -> str:
    """A content hash of a module's layers and weights (``weights``: the ``fingerprint`` of its state_dict,
    if already known): identical prefixes share a cache."""
    return hashlib.sha1(f"{module!r}|{weights or fingerprint(module.state_dict())}".encode()).hexdigest()


def _all_finite(rows: torch.Tensor, block: int = 64) -> bool:
    """isfinite over a few rows at a time: one temporary the size of a whole shard, freed after every
    shard, left the allocator holding about 0.4x the rows' bytes for the life of the process."""
    return all(bool(torch.isfinite(rows[i : i + block]).all()) for i in range(0, len(rows), block))


def shard_digest(path: str | Path) -> str:
    """``<hash>:<hex digest>`` of a file's bytes, hashed through a read-only mapping (no copy)."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        return f"{SHARD_HASH}:{hashlib.new(SHARD_HASH, view).hexdigest()}"


def verify_shard(shard: Path, recorded: tuple[str, int] | None) -> tuple[str, int]:
    """Check ``shard``'s bytes against ``recorded`` (digest, size) from its index (ValueError where they
    differ); a shard already hashed by this process and unchanged since (same identity) is not hashed again.
    Without a record, the shard's (digest, size), to be recorded."""
    st = os.stat(shard)
    if recorded is not None and st.st_size != recorded[1]:
        raise ValueError(f"{st.st_size} bytes where {recorded[1]} were written")
    memo = (os.path.abspath(shard), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if recorded is not None and (*memo, recorded[0]) in _verified:
        return recorded
    digest = shard_digest(shard)
    if recorded is not None and digest != recorded[0]:
        raise ValueError(f"its bytes differ from the {SHARD_HASH} recorded when it was written")
    _verified.add((*memo, digest))
    return digest, st.st_size


def row_width(suffix: nn.Module) -> int | None:
    """The width of the rows ``suffix`` takes: its first Linear's inputs (None: no Linear)."""
    return next((m.in_features for m in suffix.modules() if isinstance(m, nn.Linear)), None)


class FeatureCache:
    """Rows of prefix outputs keyed by ``file_key``; kept on disk under ``directory`` (or in memory).

    Each shard ``<time>-<pid>.pt`` has its index beside it, ``<time>-<pid>.keys`` (the shard's digest and
    size, then its keys, one a line; written after the shard). A run reads the indexes, then only the shards
    that hold rows it asks for (``key in cache``), verified, memory-mapped and checked when first read:
    another data set's rows in the same folder cost nothing. ``width`` is the row width this model's suffix
    takes; a shard of another width is damaged. A folder that cannot be written (read-only, full) is one
    note: the run keeps its rows in memory.
    """

    def __init__(self, directory: Path | None, namespace: dict, width: int | None = None):
        self.rows: dict[str, torch.Tensor] = {}
        self.width = width
        self.folder: Path | None = None
        self.writable = False
        self._shard_of: dict[str, str] = {}  # key -> shard file holding it, not read yet
        self._keys_of: dict[str, list[str]] = {}  # shard file -> its keys, not read yet
        self._recorded: dict[str, tuple[str, int]] = {}  # shard file -> (digest, size) its index records
        self._indexed: set[str] = set()  # shard files already indexed (or read, or written)
        self._unsaved_reason: str | None = None  # why rows cannot be saved, until said once
        if directory is None:
            return
        name = hashlib.sha1(json.dumps(namespace, sort_keys=True).encode()).hexdigest()[:20]
        self.folder = directory / "features" / name
        self.writable = self._prepare(self.folder, namespace)
        self._index_shards()

    @property
    def shard_folder(self) -> Path:
        """``folder`` where the cache is kept on disk: only a cache with a folder has shards to read or write."""
        assert self.folder is not None, "an in-memory feature cache has no shards"
        return self.folder

    def _prepare(self, folder: Path, namespace: dict) -> bool:
        """Create ``folder`` and its namespace.json; False where that cannot be done (said at the first
        row that cannot be saved: a read-only cache that holds every row needed is no news)."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):  # read-only mounts and permissions, as they are
                pass
            if not (folder / "namespace.json").exists():
                save_json(namespace, folder / "namespace.json")
        except OSError as err:
            self._unsaved_reason = f"{folder}: {err.strerror or err}"
            return False
        except OutputError as err:
            self._unsaved_reason = str(err)
            return False
        return True

    def _index_shards(self) -> None:
        if self.folder is None or not self.folder.is_dir():
            return
        for shard in sorted(self.folder.glob("*.pt")):
            if shard.name in self._indexed:
                continue
            self._indexed.add(shard.name)
            index = self._read_index(shard.with_suffix(".keys"))
            if index is None and shard.with_suffix(".keys").exists():  # what it records cannot be trusted
                self._discard(shard, "its index is damaged")
                continue
            if index is None:  # written before indexes existed, or killed between the two renames
                self._read(shard)
                continue
            keys, recorded = index
            self._keys_of[shard.name] = keys
            self._shard_of.update(dict.fromkeys(keys, shard.name))
            if recorded is not None:  # None: indexed before digests were recorded
                self._recorded[shard.name] = recorded

    @staticmethod
    def _read_index(path: Path) -> tuple[list[str], tuple[str, int] | None] | None:
        """(keys, (digest, size) or None) from an index file; None where there is none or it is damaged."""
        try:
            keys = path.read_text(encoding="ascii").split()
        except (OSError, ValueError):
            return None
        recorded = None
        if keys and keys[0].startswith(f"{SHARD_HASH}:"):
            digest, _, size = keys.pop(0).rpartition(":")
            if not size.isdigit():
                return None
            recorded = digest, int(size)
        return (keys, recorded) if all(len(key) == 40 for key in keys) else None

    def _read(self, shard: Path) -> None:
        """Verify one shard against its index's digest, load it (memory-mapped) and take its rows; a damaged
        one is deleted with a note. One indexed before digests were recorded has its digest recorded now."""
        for key in self._keys_of.pop(shard.name, []):
            if self._shard_of.get(key) == shard.name:
                del self._shard_of[key]
        recorded = self._recorded.pop(shard.name, None)
        try:
            keys, features = self._load(shard)  # first: a foreign or truncated shard is named as such
            digest = verify_shard(shard, recorded)  # before any row is used
        except Exception as err:  # corrupt, truncated, edited or foreign: never trusted, rebuilt
            self._discard(shard, str(err) if isinstance(err, ValueError) else type(err).__name__)
            return
        self.rows.update(zip(keys, features, strict=False))
        if self.writable and recorded is None:
            with contextlib.suppress(OutputError):  # read only after all: checked again next time
                self._write_index(shard, keys, digest)

    @staticmethod
    def _discard(shard: Path, why: str) -> None:
        """Delete a damaged shard and its index, with a note: its rows are extracted again."""
        log.warning(f"Feature cache: discarding damaged shard {shard} ({why}); re-extracting")
        for path in (shard, shard.with_suffix(".keys")):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def _load(self, shard: Path) -> tuple[list[str], torch.Tensor]:
        """A shard's keys and rows (memory-mapped); ValueError where they do not add up. A FIFO or device is
        never opened."""
        if not stat.S_ISREG(os.stat(shard).st_mode):
            raise ValueError("not a regular file")
        body = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        keys, features = body["keys"], body["features"]
        if not (isinstance(keys, list) and features.dim() == 2 and len(keys) == features.shape[0]):
            raise ValueError("keys and rows do not add up")
        if self.width is not None and features.shape[1] != self.width:
            raise ValueError(f"rows {features.shape[1]} wide where this model takes {self.width}")
        if features.dtype != torch.float32 or not _all_finite(features):
            raise ValueError("not finite float32 rows")
        return keys, features

    def _write_index(self, shard: Path, keys: list[str], recorded: tuple[str, int]) -> None:
        digest, size = recorded
        save_text("".join([f"{digest}:{size}\n", *(f"{key}\n" for key in keys)]), shard.with_suffix(".keys"))

    def add(self, keys: list[str], features: torch.Tensor) -> None:
        features = features.float().contiguous()
        if features.is_inference():  # made under inference mode: a normal tensor, that autograd may save
            features = features.clone()
        self.rows.update(zip(keys, features, strict=False))
        if self.writable:
            shard = self.shard_folder / f"{time.time_ns()}-{os.getpid()}.pt"
            self._indexed.add(shard.name)
            try:
                sha256 = save_torch({"keys": keys, "features": features}, shard, sha256=True)
                self._write_index(shard, keys, (f"sha256:{sha256}", shard.stat().st_size))
            except (OutputError, OSError, RuntimeError) as err:  # the cache is an optimisation: the run goes on
                self.writable, self._unsaved_reason = False, first_line(err)
        if self._unsaved_reason and self.folder is not None:
            log.warning(
                f"Feature cache: rows not saved ({self._unsaved_reason}); this run keeps its features "
                "in memory, the next one extracts them again (set cache.dir to a writable folder)"
            )
            self._unsaved_reason = None

    def reload(self) -> None:
        """Index the shards other processes have written since."""
        self._index_shards()

    def __contains__(self, key: str) -> bool:
        if key not in self.rows and key in self._shard_of:
            self._read(self.shard_folder / self._shard_of[key])
        return key in self.rows


def extract_features(
    prefix: nn.Module,
    samples: Sequence[tuple[str, int]],
    transform,
    cache: FeatureCache,
    *,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    autocast: Callable,
    desc: str = "Extracting features",
    group: Group = SINGLE,
    decoder: TensorDecoder | None = None,
    draft: int | None = None,
    layout: torch.memory_format = torch.channels_last,
) -> Rows:
    """The prefix output for every sample, in order (views of the cache's rows, gathered per batch: see
    ``features.rows``); only files the cache lacks go through the network.

    Under torchrun each rank extracts its own shard of the missing files into the shared cache folder,
    then every rank reads all of them: N processes extract N times faster and no file twice. ``decoder``
    (data.decode: gpu) decodes JPEG batches on the device instead of Pillow and ``transform`` in workers;
    ``draft`` (data.decode: draft) has Pillow read JPEGs at that many pixels a side or more. ``layout``: the
    memory format of the batches, the prefix's (``extraction_layout``).
    """
    keys = [file_key(path) for path, _ in samples]
    missing = _missing(samples, keys, cache)
    total_missing, started = len(missing), time.perf_counter()
    group.barrier()  # every rank has its list before any rank writes a shard: the lists agree
    missing = group.shard(missing)
    if missing:
        _extract_missing(
            prefix,
            missing,
            transform,
            cache,
            device=device,
            batch_size=batch_size,
            num_workers=num_workers,
            autocast=autocast,
            desc=desc,
            decoder=decoder,
            draft=draft,
            layout=layout,
        )
    if total_missing and group.active:
        _read_other_ranks(cache, keys, group)
    if total_missing:
        seconds = time.perf_counter() - started
        ranks = f" on {group.world} processes" if group.active else ""
        log.info(f"{desc}: {total_missing} images in {seconds:.1f}s ({total_missing / seconds:.2f} img/s){ranks}")
    return Rows([cache.rows[key] for key in keys])


def _missing(
    samples: Sequence[tuple[str, int]], keys: list[str], cache: FeatureCache
) -> list[tuple[tuple[str, int], str]]:
    """The (sample, key) pairs whose key the cache lacks, in order; a file listed twice is extracted once."""
    missing = [(sample, key) for sample, key in zip(samples, keys, strict=False) if key not in cache]
    return list({key: (sample, key) for sample, key in missing}.values())  # the same file twice: once


def _read_other_ranks(cache: FeatureCache, keys: list[str], group: Group) -> None:
    """Under torchrun, once every rank has extracted its share: index their shards, and check that the cache
    now holds every key (ConfigError where the ranks do not share the folder)."""
    group.barrier()  # every rank's shards are on disk
    cache.reload()
    if any(key not in cache for key in keys):
        raise ConfigError(
            f"cache.dir: '{cache.folder}' does not hold the features the other processes extracted; on "
            "several machines it must be a shared folder every node sees (set cache.dir), or use cache: off"
        )


def _extract_missing(
    prefix, missing, transform, cache: FeatureCache, *, device, batch_size, num_workers, autocast, desc, **decoding
) -> None:
    """Run the prefix over ``missing`` (sample, key) pairs, adding a shard every SHARD_ROWS rows.
    ``decoding``: device_batches' decoder, draft and layout."""
    batches = device_batches(
        [sample for sample, _ in missing],
        transform,
        decoding.get("decoder"),
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        draft=decoding.get("draft"),
        memory_format=decoding.get("layout", torch.channels_last),
    )
    pending_keys: list[str] = []
    pending: list[torch.Tensor] = []
    done = 0
    counter = Counter(desc=desc, total=len(missing))
    try:
        for images in batches:
            with torch.inference_mode(), autocast():
                output = prefix(images)
            pending.append(output.float().cpu())
            pending_keys.extend(key for _, key in missing[done : done + len(images)])
            done += len(images)
            counter.update(len(images))
            if len(pending_keys) >= SHARD_ROWS:
                cache.add(pending_keys, torch.cat(pending))
                pending_keys, pending = [], []
    except KeyboardInterrupt:
        if pending_keys:
            cache.add(pending_keys, torch.cat(pending))
        if cache.folder is None or not cache.writable:
            raise  # nothing kept: the plain "interrupted"
        raise Interrupted(  # every row this run extracted (or found) so far, the splits before this one's too
            f"Interrupted during extraction: the {len(cache.rows):,} rows extracted so far are kept in "
            f"{cache.folder}; the next run starts from there"
        ) from None
    finally:
        counter.close()
    if pending_keys:
        cache.add(pending_keys, torch.cat(pending))


def cache_off_reason(cfg: Config, model: models.VGG | None = None, cut: str | None = None) -> tuple[str, str] | None:
    """(why, fix) when training cannot read cached rows; None when it can. From the config alone before a model
    is built; with the model (and where its frozen prefix ends), from what is really frozen."""
    if not cfg.cache.enabled:
        return "cache.enabled is false", "remove cache: off (or set cache.enabled: true)"
    if cfg.data.augment != "none":
        return (
            f"data.augment is '{cfg.data.augment}': random augmentation changes the input every epoch",
            "set data.augment: none",
        )
    if cfg.model.unfreeze or (model is not None and any(p.requires_grad for p in model.features.parameters())):
        return (
            "part of the backbone is unfrozen (model.unfreeze): its features change every step",
            "set model.unfreeze: 0",
        )
    if cut == "input":
        return "nothing at the input is frozen", "freeze the backbone (model.unfreeze: 0)"
    return None


class FeatureSource:
    """Where the loop's inputs come from for one model: cached rows of the frozen prefix (``module`` is
    the suffix), or decoded images (``module`` is the whole network).

    ``rows_in_memory``: where the cache is off, ``rows`` still works, its rows kept in memory for this source
    alone (a one-off pass over the prefix, such as check-data --near-duplicates with cache.enabled false).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        device: torch.device,
        precision: torch.dtype | None,
        group: Group = SINGLE,
        *,
        rows_in_memory: bool = False,
        weights_file: Path | None = None,
    ):
        self.cfg, self.device, self.precision, self.group = cfg, device, precision, group
        self.prefix, self.suffix, self.cut = split_frozen_prefix(model)
        self.workers = resolve_workers(cfg.data, device)
        self.off = cache_off_reason(cfg, model, self.cut)  # (why, fix) when the loop cannot read cached rows
        self.decode = resolve_decode(cfg.data.decode, device)  # for extraction; images for the loop: Pillow
        self.decoder = TensorDecoder(cfg.data) if self.decode.startswith("gpu") else None
        self.draft = draft_target(cfg.data) if self.decode == "draft" else None
        self.layout = extraction_layout(device, precision)
        self.cache: FeatureCache | None = None
        self.prefix_weights: str | None = None  # the prefix's weights' fingerprint, when the cache needs it
        if self.off is None:
            self.prefix_weights = self._prefix_weights(model, weights_file)
            namespace = {
                "arch": cfg.model.arch,
                "cut": self.cut,
                "prefix": module_fingerprint(self.prefix, self.prefix_weights),
                "transform": transform_signature(cfg.data),
                "precision": str(precision or "fp32"),
                "torch": torch.__version__.split("+")[0],
                "decode": self.decode,
            }
            self.cache = FeatureCache(cache_root(cfg.cache.dir), namespace, row_width(self.suffix))
            self.module = self.suffix
        else:
            self.module = nn.Sequential(self.prefix, self.suffix)
            if rows_in_memory:
                self.cache = FeatureCache(None, {}, row_width(self.suffix))
        # torch's stubs lack Module.to's memory_format keyword (nn.Module.to accepts it at run time)
        self.prefix.to(device, memory_format=self.layout)  # type: ignore[call-overload]
        self.suffix.to(device)

    def _prefix_weights(self, model: nn.Module, weights_file: Path | None) -> str:
        """The fingerprint of the prefix's weights. ``weights_file``: the file ``model`` was just built from, if
        it was; the fingerprint is then memoised (keyed by the file's identity) when the file holds every
        prefix weight, so a warm run does not hash ~470 MB again."""

        def content() -> str:
            return fingerprint(self.prefix.state_dict())

        if weights_file is None or not holds_every_tensor(weights_file, model, self.prefix):
            return content()
        layout = [(k, tuple(v.shape), str(v.dtype)) for k, v in self.prefix.state_dict().items()]
        key = f"prefix weights|{file_key(str(weights_file))}|{self.prefix!r}|{layout}|{torch.__version__}"
        return memoised(key, cache_root(self.cfg.cache.dir), content)

    @property
    def off_reason(self) -> str | None:
        """Why the loop does not read cached rows; None when it does."""
        return self.off[0] if self.off is not None else None

    @property
    def cached(self) -> bool:
        return self.cache is not None

    @property
    def module_precision(self) -> torch.dtype | None:
        """The precision ``module`` computes in: the whole network in ``precision``; the suffix over cached rows
        in fp32, as the tuning commands fit heads (a few small matmuls gain nothing from autocast, and on the
        CPU casting classifier[3]'s 16.8M weights for each batch made bf16 head epochs 1.6x slower than fp32)."""
        return None if self.cached else self.precision

    @property
    def loader_workers(self) -> int:
        return 0 if self.cached else self.workers  # cached rows are already in memory

    def describe(self) -> str:
        if self.cache is None:
            unused = "; data.decode: gpu serves extraction only, so Pillow decodes" if self.decoder else ""
            return f"Feature cache off: {self.off_reason}{unused}"
        where = self.cache.folder or "memory"
        if self.cache.folder is not None and not self.cache.writable:
            where = f"{where} (read only: new rows stay in memory)"
        return f"Feature cache: frozen prefix up to {self.cut}, cached under {where}"

    def bytes_to_write(self, samples: Sequence[tuple[str, int]]) -> tuple[Path, int] | None:
        """(cache folder, bytes) that extracting ``samples`` will add; None when nothing goes to disk."""
        if self.cache is None or not self.cache.writable:
            return None
        missing = {key for key in (file_key(path) for path, _ in samples) if key not in self.cache}
        return self.cache.shard_folder, len(missing) * (row_width(self.suffix) or 0) * 4

    def rows(self, samples: Sequence[tuple[str, int]], desc: str = "") -> Rows:
        """The prefix output of every sample: cached rows, extracting what the cache lacks (the slow part)."""
        assert self.cache is not None, "rows come from a cache (cache.enabled, or rows_in_memory)"
        return extract_features(
            self.prefix,
            samples,
            eval_transform(self.cfg.data),
            self.cache,
            device=self.device,
            batch_size=self.cfg.data.eval_batch_size,
            num_workers=self.workers,
            autocast=autocast_factory(self.device, self.precision),
            desc=f"Extracting {desc} features".replace("  ", " "),
            group=self.group,
            decoder=self.decoder,
            draft=self.draft,
            layout=self.layout,
        )

    def dataset(
        self, samples: Sequence[tuple[str, int]], *, train: bool = False, desc: str = ""
    ) -> ImageList | RowDataset:
        """(input, label) pairs for the loop: rows (extracted now if missing) or images decoded each epoch."""
        if self.cache is None:
            return ImageList(samples, train_transform(self.cfg.data) if train else eval_transform(self.cfg.data))
        labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        return RowDataset(self.rows(samples, desc), labels)
