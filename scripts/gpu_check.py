#!/usr/bin/env python
"""Every CUDA code path of vggft, end to end on generated data, then benchmarks: one table, one JSON file.

    python scripts/gpu_check.py --out gpu.json                        # on a CUDA machine (a few minutes)
    python scripts/gpu_check.py --device cpu --tiny --out cpu.json    # the same script on a CPU, under a minute

Checks (each in its own try: a failure is a row with its error, never the end of the script):
train with cached features and without (augmentation: images decoded every epoch by DataLoader workers
into pinned memory), data.decode gpu, model.unfreeze under bf16 and under fp16 with a GradScaler, resume
from last.pt, eval, predict, export (TorchScript; ONNX run on onnxruntime's CUDA provider where it is
installed), the per-file Pillow fallback of the GPU decoder on dirty files and its distance from Pillow,
`train --nproc 2` over nccl with two GPUs (one GPU: an nccl all_reduce in a one-process torchrun job),
and a deliberate out-of-memory (a huge eval batch under a 2 GiB CUDA memory cap) that must come out of
`vggft eval` as one line with exit code 7. Benchmarks: the bare `features` forward (fp32, channels_last,
bf16, fp16, torch.compile), decoding (Pillow in N workers; decode_jpeg batched on the device), cold
extraction with each decode path, and a warm epoch on cached rows against the head's own compute.

Nothing is downloaded: model.weights is null (seeded random init) unless --weights names a local file.
On a CPU what needs CUDA is a row 'skipped: needs CUDA', never left out. Exit status 1 if any row failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # this checkout's vggft, wherever the script is run from
sys.path.insert(1, str(HERE))  # decode_tolerance


@dataclass(frozen=True)
class Mode:
    """Sizes of one run: the real thing on a GPU, or a tiny smoke run on a CPU."""

    arch: str
    head: str
    image_size: int
    resize: int
    train_per_class: int
    test_per_class: int
    picture_px: int
    epochs: int
    batch_size: int
    eval_batch_size: int
    bench_images: int
    bench_batch: int
    bench_seconds: float


FULL = Mode("vgg16", "classifier6", 224, 256, 64, 32, 160, 2, 32, 128, 1024, 128, 3.0)
TINY = Mode("vgg11", "gap", 32, 36, 4, 2, 48, 1, 4, 8, 16, 8, 0.1)


class Skip(Exception):
    """A row that cannot run here; the message says why."""


class NotesHandler(logging.Handler):
    """The notes vggft logs during one row (its library code never prints)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def find(self, text: str) -> str:
        return next((line for line in self.lines if text in line), "")


class Report:
    """Rows as they finish: printed to stderr one by one, rewritten to --out after each (a timeout keeps them)."""

    def __init__(self, header: dict, out: Path | None, only: set[str]):
        self.header, self.out, self.only = header, out, only
        self.checks: list[dict] = []
        self.benchmarks: list[dict] = []
        self.started = time.perf_counter()

    def run(self, kind: str, name: str, fn, unit: str = "") -> object:
        """Run ``fn`` as the row ``name``: its return is the detail (a check) or (value, detail) (a benchmark)."""
        row = {"name": name, "status": "passed", "detail": "", "seconds": 0.0}
        if kind == "benchmark":
            row.update(value=None, unit=unit)
        started = time.perf_counter()
        result = None
        try:
            if self.only and not any(word in name for word in self.only):
                raise Skip("not selected (--only)")
            result = fn()
            if kind == "benchmark":
                row["value"], row["detail"] = result
            else:
                row["detail"] = result or ""
        except Skip as skip:
            row.update(status="skipped", detail=f"skipped: {skip}")
        except BaseException as err:  # one row's failure must not hide the others
            if isinstance(err, KeyboardInterrupt):
                raise
            text = str(err).strip().splitlines()
            row.update(
                status="failed",
                detail=f"{type(err).__name__}: {text[0] if text else ''}",
                traceback=traceback.format_exc(limit=-12),
            )
        row["seconds"] = round(time.perf_counter() - started, 2)
        (self.benchmarks if kind == "benchmark" else self.checks).append(row)
        shown = f"{row['value']:.1f} {unit} " if kind == "benchmark" and row["value"] is not None else ""
        print(
            f"[{row['status']:>7}] {name}: {shown}{row['detail']} ({row['seconds']:.1f}s)", file=sys.stderr, flush=True
        )
        self.save()
        return result if row["status"] == "passed" else None

    @property
    def failed(self) -> list[dict]:
        return [row for row in self.checks + self.benchmarks if row["status"] == "failed"]

    def body(self) -> dict:
        return {
            **self.header,
            "seconds": round(time.perf_counter() - self.started, 1),
            "checks": self.checks,
            "benchmarks": self.benchmarks,
            "failed": len(self.failed),
        }

    def save(self) -> None:
        if self.out is not None:
            tmp = self.out.with_name(self.out.name + ".tmp")
            tmp.write_text(json.dumps(self.body(), indent=2) + "\n")
            os.replace(tmp, self.out)

    def table(self) -> str:
        h = self.header
        lines = [
            f"vggft gpu_check on {h['device_name']} ({h['device']}; torch {h['torch']}, torchvision "
            f"{h['torchvision']}, CUDA {h['cuda'] or 'none'}; {h['mode']} mode, "
            f"{h['arch']} at {h['image_size']} px)"
        ]
        width = max(len(r["name"]) for r in self.checks + self.benchmarks) if self.checks else 20
        lines.append(f"{'check':<{width}}  {'status':<7}  {'s':>6}  detail")
        for r in self.checks:
            lines.append(f"{r['name']:<{width}}  {r['status']:<7}  {r['seconds']:>6.1f}  {r['detail']}")
        lines.append(f"{'benchmark':<{width}}  {'value':>14}  detail")
        for r in self.benchmarks:
            value = f"{r['value']:,.1f} {r['unit']}" if r["value"] is not None else r["status"]
            lines.append(f"{r['name']:<{width}}  {value:>14}  {r['detail']}")
        lines.append(f"{len(self.failed)} failed; {round(time.perf_counter() - self.started)} s in all")
        return "\n".join(lines)


class GpuCheck:
    """The checks and benchmarks, sharing one work folder, the generated data and the trained weights."""

    def __init__(self, args, mode: Mode, device, work: Path, report: Report, notes: NotesHandler):
        import torch

        self.torch = torch
        self.args, self.mode, self.device, self.work, self.report, self.notes = args, mode, device, work, report, notes
        self.cuda = device.type == "cuda"
        self.workers = args.workers
        self.results: dict[str, object] = {}  # what later rows build on (trained weights, run folders)
        self.data = work / "data"

    # --- helpers --------------------------------------------------------------------------------

    def needs_cuda(self) -> None:
        if not self.cuda:
            raise Skip("needs CUDA")

    def needs(self, key: str, what: str):
        if key not in self.results:
            raise Skip(f"needs {what}, which did not pass")
        return self.results[key]

    def overrides(self, name: str, *extra: str) -> list[str]:
        m = self.mode
        return [
            f"data.root={self.data}",
            f"model.arch={m.arch}",
            f"model.head={m.head}",
            f"model.weights={self.args.weights or 'null'}",
            f"data.image_size={m.image_size}",
            f"data.resize={m.resize}",
            f"train.epochs={m.epochs}",
            f"data.batch_size={m.batch_size}",
            f"data.eval_batch_size={m.eval_batch_size}",
            f"data.num_workers={self.workers}",
            f"train.device={self.device}",
            f"cache.dir={self.work / 'cache'}",
            f"output.runs_dir={self.work / 'runs'}",
            f"output.weights={self.work / 'models' / name / 'VGG.pt'}",
            f"output.name={name}",
            *extra,
        ]

    def fit(self, name: str, *extra: str, expect: str):
        from vggft.config.loading import load_config
        from vggft.training.train import fit

        self.notes.lines.clear()
        result = fit(load_config(None, self.overrides(name, *extra)))
        n_test = 2 * self.mode.test_per_class
        if result.test is None or result.test.total != n_test:
            raise AssertionError(f"tested {result.test.total if result.test else 0} images, expected {n_test}")
        if len(result.history) != self.mode.epochs:
            raise AssertionError(f"{len(result.history)} epochs in the history, expected {self.mode.epochs}")
        if not self.notes.find(expect):
            raise AssertionError(f"no note saying '{expect}'")
        if not self.notes.find(f"device {self.device}"):
            raise AssertionError(f"the model did not run on {self.device}: {self.notes.find('Model:')}")
        self.results[name] = result
        extraction = self.notes.find("Extracting train features")
        rate = f", extraction {extraction.split('(')[-1].rstrip(')')}" if extraction else ""
        return f"test acc {100 * result.test.accuracy:.1f}% ({result.test.correct}/{result.test.total}){rate}"

    def subprocess_env(self) -> dict:
        path = os.environ.get("PYTHONPATH", "")
        return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), path) if p), "PYTHONUNBUFFERED": "1"}

    # --- checks ---------------------------------------------------------------------------------

    def checks(self) -> None:
        run = lambda name, fn: self.report.run("check", name, fn)  # noqa: E731
        w = self.workers
        run(
            f"train, cached features, data.decode pil ({w} workers)",
            lambda: self.fit("cached", "data.decode=pil", expect="Feature cache: frozen prefix"),
        )
        pinned = ", pinned memory" if self.cuda else ""
        run(
            f"train, uncached (augment light): {w} workers{pinned}",
            lambda: self.fit("uncached", "data.augment=light", expect="Feature cache off"),
        )
        run("train, cached, data.decode gpu", self.check_decode_gpu_train)
        run("model.unfreeze 1, amp bf16", self.check_bf16)
        run("model.unfreeze 1, amp fp16 + GradScaler", self.check_fp16)
        run("resume from last.pt", self.check_resume)
        run("eval", self.check_eval)
        run("predict", self.check_predict)
        run("export torchscript", lambda: self.check_export("torchscript"))
        run("export onnx", lambda: self.check_export("onnx"))
        run("decode: per-file Pillow fallback on dirty files", self.check_fallback)
        run("decode: gpu vs pil, prefix outputs", self.check_tolerance)
        run("train --nproc 2 (nccl)", self.check_nproc2)
        run("nccl in a one-process torchrun job", self.check_nccl_one)
        run("out of memory: one line, exit 7", self.check_oom)

    def check_decode_gpu_train(self) -> str:
        # Another cache key than the pil run's: the train split is extracted again, through the tensor path.
        detail = self.fit("decode_gpu", "data.decode=gpu", expect="Extracting train features")
        return f"{detail}; decode {'on the GPU' if self.cuda else 'tensor path on the CPU'}"

    def check_bf16(self) -> str:
        if self.cuda and not self.torch.cuda.is_bf16_supported():
            raise Skip("this GPU has no bf16")
        return self.fit("bf16", "model.unfreeze=1", "train.amp=bf16", expect="Feature cache off")

    def check_fp16(self) -> str:
        from vggft.model.checkpoints import load_checkpoint

        detail = self.fit("fp16", "model.unfreeze=1", "train.amp=fp16", expect="Feature cache off")
        scaler = load_checkpoint(self.results["fp16"].run_dir / "last.pt").get("scaler")
        if not scaler or "scale" not in scaler:
            raise AssertionError("last.pt holds no GradScaler state")
        return f"{detail}; GradScaler scale {scaler['scale']:g} saved in last.pt"

    def check_resume(self) -> str:
        from vggft.training.train import fit, resume_config

        name = next((n for n in ("fp16", "bf16", "cached") if n in self.results), None)
        if name is None:
            raise Skip("needs a finished run, and none passed")
        last = self.results[name].run_dir / "last.pt"
        self.notes.lines.clear()
        result = fit(resume_config(last, [f"train.epochs={self.mode.epochs + 1}"]), resume=last)
        if [row["epoch"] for row in result.history] != list(range(1, self.mode.epochs + 2)):
            raise AssertionError(f"history epochs {[row['epoch'] for row in result.history]}")
        if result.run_dir != last.parent or not self.notes.find("Resuming"):
            raise AssertionError("did not go on in the same run folder")
        return f"run '{name}' went on to epoch {self.mode.epochs + 1}; test acc {100 * result.test.accuracy:.1f}%"

    def check_eval(self) -> str:
        from vggft.diagnostics.evaluation import evaluate_weights

        trained = self.needs("cached", "the cached run's weights")
        metrics, _, written = evaluate_weights(trained.weights, plots_dir=self.work / "plots")
        if metrics.total != 2 * self.mode.test_per_class or not written:
            raise AssertionError(f"scored {metrics.total} images, wrote {written}")
        return metrics.summary_line()

    def check_predict(self) -> str:
        from vggft.model.inference import predict

        trained = self.needs("cached", "the cached run's weights")
        rows = predict(trained.weights, [self.data / "test"], batch_size=self.mode.eval_batch_size)
        errors = [row for row in rows if "error" in row]
        if len(rows) != 2 * self.mode.test_per_class or errors:
            raise AssertionError(f"{len(rows)} rows, errors: {errors[:1]}")
        return f"{len(rows)} images, top-1 of the first: {rows[0]['top'][0]['class']}"

    def check_export(self, fmt: str) -> str:
        import importlib.util

        from vggft.model.export import ONNX_PACKAGES, export

        trained = self.needs("cached", "the cached run's weights")
        if fmt == "onnx" and any(importlib.util.find_spec(name) is None for name in ONNX_PACKAGES):
            raise Skip(f"needs {', '.join(ONNX_PACKAGES)} (pip install 'vggft[onnx]')")
        path, diff = export(trained.weights, fmt, self.work / "export" / f"VGG.{fmt}")
        detail = f"{path.stat().st_size / 1e6:.1f} MB, max |diff| vs PyTorch on the CPU {diff:.1e}"
        if fmt == "onnx":
            detail += "; " + self.onnx_on_device(path, trained.weights)
        return detail

    def onnx_on_device(self, path: Path, weights: Path) -> str:
        import onnxruntime

        from vggft.model.inference import load_model

        torch = self.torch
        provider = "CUDAExecutionProvider" if self.cuda else "CPUExecutionProvider"
        if provider not in onnxruntime.get_available_providers():
            return f"{provider} not available (onnxruntime-gpu not installed): run on CPUExecutionProvider only"
        session = onnxruntime.InferenceSession(str(path), providers=[provider])
        model = load_model(weights).model.to(self.device).eval()
        size = self.mode.image_size
        batch = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(2))
        with torch.inference_mode():
            expected = model(batch.to(self.device)).float().cpu()
        (logits,) = session.run(["logits"], {"images": batch.numpy()})
        diff = float((torch.from_numpy(logits) - expected).abs().max())
        if not diff <= 1e-2:  # TF32 convolutions on both sides; far more than this is a wrong graph
            raise AssertionError(f"{provider} differs from PyTorch on {self.device} by {diff:.1e}")
        if session.get_providers()[0] != provider:
            raise AssertionError(f"onnxruntime fell back to {session.get_providers()}")
        return f"{provider}: max |diff| vs PyTorch on {self.device} {diff:.1e}"

    def check_fallback(self) -> str:
        from PIL import Image

        from decode_tolerance import make_jpegs
        from vggft.config.schema import DataConfig
        from vggft.data.decode import TensorDecoder, device_batches
        from vggft.data.transforms import eval_transform

        torch = self.torch
        folder = self.work / "dirty"
        samples = make_jpegs(folder, 8)  # one of them grayscale: the tensor path takes it
        noise = Image.effect_noise((96, 64), 40).convert("RGB")
        noise.save(folder / "png_named.jpg", format="PNG")
        noise.convert("CMYK").save(folder / "cmyk.jpg")
        noise.save(folder / "progressive.jpg", progressive=True)
        exif = Image.Exif()
        exif[0x0112] = 6
        noise.save(folder / "rotated.jpg", exif=exif)
        expected = {"not a JPEG": 1, "CMYK": 1, "progressive": 1, "EXIF-rotated": 1}
        samples += [(str(folder / n), 0) for n in ("png_named.jpg", "cmyk.jpg", "progressive.jpg", "rotated.jpg")]
        data = DataConfig(image_size=self.mode.image_size, resize=self.mode.resize)
        decoder = TensorDecoder(data)
        batch = dict(batch_size=6, device=self.device, num_workers=self.workers)
        tensor = torch.cat(list(decoder.batches(samples, **batch)))
        pil = torch.cat(list(device_batches(samples, eval_transform(data), None, **batch)))
        if dict(decoder.fallbacks) != expected:
            raise AssertionError(f"fallbacks {dict(decoder.fallbacks)}, expected {expected}")
        if not torch.equal(tensor[8:], pil[8:]):
            raise AssertionError("a fallback file differs from what data.decode: pil gives")
        return (
            f"{sum(expected.values())} of {len(samples)} files through Pillow, as expected: {dict(decoder.fallbacks)}"
        )

    def check_tolerance(self) -> str:
        from decode_tolerance import compare, make_jpegs
        from vggft.config.schema import DataConfig, ModelConfig
        from vggft.model.build import build_model, split_frozen_prefix

        torch = self.torch
        torch.manual_seed(0)
        prefix, _, cut = split_frozen_prefix(
            build_model(ModelConfig(arch=self.mode.arch, head=self.mode.head, weights=None), 2, None)
        )
        data = DataConfig(image_size=self.mode.image_size, resize=self.mode.resize)
        result = compare(make_jpegs(self.work / "tolerance", 16), data, prefix, self.device)
        self.results["tolerance"] = result
        detail = (
            f"pixels max |diff| {result['pixel_levels']:.1f}/255, prefix ({cut}) max |diff| "
            f"{result['feature_max_abs_diff']:.2e} = {result['feature_relative']:.1e} of max |value|"
        )
        # libjpeg-turbo both ways on a CPU: 1 level, ~1e-3; nvJPEG's IDCT and upsampling differ a little more.
        if result["pixel_levels"] > 16 or result["feature_relative"] > 0.05:
            raise AssertionError(f"too far apart: {detail}")
        return detail

    def check_nproc2(self) -> str:
        self.needs_cuda()
        count = self.torch.cuda.device_count()
        if count < 2:
            raise Skip(f"needs 2 GPUs ({count} visible); the one-process nccl row below stands in")
        args = [a for o in self.overrides("nproc2", "train.device=cuda") for a in ("--set", o)]
        done = subprocess.run(
            [sys.executable, "-m", "vggft", "train", "--nproc", "2", *args, "--quiet"],
            capture_output=True,
            text=True,
            env=self.subprocess_env(),
            timeout=900,
        )
        if done.returncode != 0 or "x 2 processes" not in done.stderr:
            raise AssertionError(f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
        return done.stdout.strip().splitlines()[0]

    def check_nccl_one(self) -> str:
        self.needs_cuda()
        script = self.work / "nccl_smoke.py"
        script.write_text(
            "import os, torch, torch.distributed as dist\n"
            "torch.cuda.set_device(int(os.environ['LOCAL_RANK']))\n"
            "dist.init_process_group('nccl')\n"
            "x = torch.full((4,), 3.0, device='cuda')\n"
            "dist.all_reduce(x)\n"
            "dist.barrier()\n"
            "assert x.tolist() == [3.0] * 4, x\n"
            "print('nccl', torch.cuda.nccl.version(), 'world', dist.get_world_size())\n"
            "dist.destroy_process_group()\n"
        )
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", str(script)],
            capture_output=True,
            text=True,
            env=self.subprocess_env(),
            timeout=300,
        )
        if done.returncode != 0:
            raise AssertionError(f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
        return done.stdout.strip().splitlines()[-1]

    def check_oom(self) -> str:
        """`vggft eval` of 256 images at 224 px in one batch under a 2 GiB CUDA cap: one line, exit 7."""
        from vggft.data.demo import make_demo_data

        self.needs_cuda()
        trained = self.needs("cached", "the cached run's weights")
        root = make_demo_data(self.work / "oom", train_per_class=0, test_per_class=128, size=64, seed=3)
        shutil.rmtree(root / "train")  # its class folders are empty: a folder of test/ alone is what eval scores
        index = self.device.index or 0
        code = (
            "import sys, torch\n"
            f"torch.cuda.set_per_process_memory_fraction(min(1.0, 2 * 2**30 / "
            f"torch.cuda.get_device_properties({index}).total_memory), {index})\n"
            "from vggft.cli import run\n"
            "sys.argv = ['vggft', *sys.argv[1:]]\n"
            "run()\n"
        )
        sets = [
            f"data.root={root}",
            "data.eval_batch_size=1000000",
            "data.image_size=224",
            "data.resize=256",
            f"cache.dir={self.work / 'oom_cache'}",
            f"train.device={self.device}",
        ]
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                "eval",
                "--weights",
                str(trained.weights),
                *[a for s in sets for a in ("--set", s)],
                "--quiet",
            ],
            capture_output=True,
            text=True,
            env=self.subprocess_env(),
            timeout=300,
        )
        lines = done.stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("error")]
        if done.returncode != 7 or len(errors) != 1 or lines[-1] != errors[0] or "Traceback" in done.stderr:
            raise AssertionError(f"exit {done.returncode}, stderr ends {lines[-3:]}")
        if "out of memory on cuda" not in errors[0] or "eval_batch_size" not in errors[0]:
            raise AssertionError(f"not the out-of-memory line: {errors[0]}")
        return errors[0]

    # --- benchmarks -----------------------------------------------------------------------------

    def benchmarks(self) -> None:
        torch = self.torch
        bench = lambda name, fn, unit="img/s": self.report.run("benchmark", name, fn, unit)  # noqa: E731
        variants = [
            ("fp32", None, False, False),
            ("fp32 channels_last", None, True, False),
            ("bf16 channels_last", torch.bfloat16, True, False),
            ("fp16 channels_last", torch.float16, True, False),
            ("bf16 channels_last, torch.compile", torch.bfloat16, True, True),
        ]
        for label, dtype, channels_last, compiled in variants:
            bench(
                f"features forward, {label}", lambda d=dtype, c=channels_last, k=compiled: self.bench_forward(d, c, k)
            )
        samples = self.bench_samples()
        bench(f"decode: Pillow + eval transform, {self.workers} workers", lambda: self.bench_pil_decode(samples))
        where = "GPU" if self.cuda else "CPU"
        bench(
            f"decode: decode_jpeg batched on the {where} (bytes in memory)", lambda: self.bench_tensor_decode(samples)
        )
        bench(
            f"decode: data.decode gpu loader ({self.workers} workers read bytes)",
            lambda: self.bench_decode_loader(samples),
        )
        for decode in ("pil", "gpu"):
            bench(f"cold extraction, data.decode {decode}", lambda d=decode: self.bench_cold(samples, d))
        bench("warm epoch on cached rows", lambda: self.bench_warm(samples), "s")

    def timed(self, step, count_per_step: int) -> tuple[float, int]:
        """(img/s, steps) of ``step`` run for at least --bench-seconds and 3 steps, after 2 warm-up steps."""
        sync = self.torch.cuda.synchronize if self.cuda else (lambda: None)
        for _ in range(2):
            step()
        sync()
        steps, started = 0, time.perf_counter()
        while steps < 3 or time.perf_counter() - started < self.mode.bench_seconds:
            step()
            steps += 1
            if steps % 5 == 0:
                sync()
        sync()
        return steps * count_per_step / (time.perf_counter() - started), steps

    def bench_forward(self, dtype, channels_last: bool, compiled: bool):
        import contextlib
        import copy

        from vggft.model.build import vgg

        torch = self.torch
        if dtype == torch.bfloat16 and self.cuda and not torch.cuda.is_bf16_supported():
            raise Skip("this GPU has no bf16")
        if compiled and not self.cuda and self.args.tiny:
            raise Skip(
                "needs CUDA here: in --tiny mode on a CPU, inductor's C++ compile would take longer "
                "than the whole run (run without --tiny to time it on the CPU)"
            )
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if "features" not in self.results:  # built once: a random VGG's classifier alone takes seconds to initialise
            self.results["features"] = vgg(self.mode.arch).features.eval()
        model = copy.deepcopy(self.results["features"]).to(self.device, memory_format=fmt)
        size, n = self.mode.image_size, self.mode.bench_batch
        batch = torch.randn(n, 3, size, size, device=self.device).contiguous(memory_format=fmt)
        autocast = (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        compile_s = 0.0
        if compiled:
            started = time.perf_counter()
            model = torch.compile(model)
            with torch.inference_mode(), autocast():
                model(batch)
            compile_s = time.perf_counter() - started

        def step():
            with torch.inference_mode(), autocast():
                model(batch)

        rate, steps = self.timed(step, n)
        extra = f", compiled in {compile_s:.0f}s" if compiled else ""
        self.results.setdefault("forward", {})[(dtype, channels_last, compiled)] = rate
        return rate, f"batch {n} at {size} px, {steps} batches{extra}"

    def bench_samples(self) -> list[tuple[str, int]]:
        from decode_tolerance import make_jpegs

        folder, count = self.work / "bench", self.mode.bench_images
        parts = max(1, min(os.cpu_count() or 1, 16, count // 32))
        with concurrent.futures.ProcessPoolExecutor(parts) as pool:  # 1024 JPEGs in about a second
            jobs = [
                pool.submit(make_jpegs, folder / f"part{k}", count // parts + (k < count % parts), k)
                for k in range(parts)
            ]
            samples = [s for job in jobs for s in job.result()]
        labels = {path: label for path, label in samples}
        for path in labels:  # class folders, so that vggft reads the bench images as a train split
            target = folder / "train" / ("even", "odd")[labels[path]] / f"{Path(path).parent.name}_{Path(path).name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        for part in folder.glob("part*"):
            part.rmdir()
        return sorted((str(p), ("even", "odd").index(p.parent.name)) for p in (folder / "train").rglob("*.jpg"))

    def bench_pil_decode(self, samples):
        from vggft.config.schema import DataConfig
        from vggft.data.loaders import image_loader
        from vggft.data.transforms import eval_transform

        data = DataConfig(image_size=self.mode.image_size, resize=self.mode.resize)
        loader = image_loader(
            samples, eval_transform(data), self.mode.eval_batch_size, device=self.device, num_workers=self.workers
        )
        started = time.perf_counter()
        count = sum(len(images) for images, _ in loader)
        return count / (time.perf_counter() - started), f"{count} JPEGs to {data.image_size} px tensors"

    def bench_tensor_decode(self, samples):
        from vggft.config.schema import DataConfig
        from vggft.data.decode import Packed, TensorDecoder

        torch = self.torch
        decoder = TensorDecoder(DataConfig(image_size=self.mode.image_size, resize=self.mode.resize))
        items = [(torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8), "") for p, _ in samples]
        n = min(self.mode.eval_batch_size, len(items))
        chunks = [items[i : i + n] for i in range(0, len(items) - n + 1, n)]  # whole batches only
        on = self.device if self.cuda else torch.device("cpu")
        position = [0]

        def step():
            chunk = chunks[position[0] % len(chunks)]
            position[0] += 1
            decoder.decode(Packed.collate(chunk), [""] * len(chunk), on)

        rate, steps = self.timed(step, n)
        self.results["decode_gpu"] = rate
        return rate, f"batches of {len(chunks[0])}, decode + resize + crop + normalise, {steps} batches"

    def bench_decode_loader(self, samples):
        from vggft.config.schema import DataConfig
        from vggft.data.decode import TensorDecoder

        decoder = TensorDecoder(DataConfig(image_size=self.mode.image_size, resize=self.mode.resize))
        started = time.perf_counter()
        count = sum(
            len(b)
            for b in decoder.batches(
                samples, batch_size=self.mode.eval_batch_size, device=self.device, num_workers=self.workers
            )
        )
        if self.cuda:
            self.torch.cuda.synchronize()
        return count / (time.perf_counter() - started), f"{count} files, fallbacks {dict(decoder.fallbacks) or 'none'}"

    def source(self, decode: str, cache_dir: Path):
        from vggft.config.loading import load_config
        from vggft.features.cache import FeatureSource
        from vggft.model.build import build_model
        from vggft.utils.device import autocast_dtype

        cfg = load_config(
            None,
            self.overrides(
                "bench", f"data.decode={decode}", f"cache.dir={cache_dir}", f"data.root={self.work / 'bench'}"
            ),
        )
        if "bench_model" not in self.results:  # one model for the bench rows: the same prefix, the same cache
            self.torch.manual_seed(0)
            weights = _state_dict(self.args.weights) if self.args.weights else None
            self.results["bench_model"] = build_model(cfg.model, 2, weights)
        model = self.results["bench_model"]
        return FeatureSource(model, cfg, self.device, autocast_dtype(self.device, cfg.train.amp)), cfg

    def bench_cold(self, samples, decode: str):
        source, cfg = self.source(decode, self.work / f"bench_cache_{decode}")
        started = time.perf_counter()
        rows = source.rows(samples, "bench")
        rate = len(rows) / (time.perf_counter() - started)
        self.results.setdefault("cold", {})[decode] = rate
        precision = source.precision
        detail = f"{len(rows)} JPEGs, decode path {source.decode}, precision {precision or 'fp32'}"
        forward = self.results.get("forward", {}).get((precision, True, False))
        decode_rate = self.results.get("decode_gpu")
        if forward and decode_rate:  # the issue's target on a GPU: at least 70% of the slower of the two
            ceiling = min(forward, decode_rate)
            detail += (
                f"; {100 * rate / ceiling:.0f}% of min(bare channels_last forward {forward:.0f}, "
                f"batched decode {decode_rate:.0f}) img/s"
            )
        return rate, detail

    def bench_warm(self, samples):
        """One training epoch of the head on cached rows (the loop vggft runs), against the head's compute alone."""
        from torch import nn
        from torch.utils.data import TensorDataset

        from vggft.data.loaders import make_loader
        from vggft.training.loop import train_one_epoch
        from vggft.training.optim import make_optimizer

        torch = self.torch
        source, cfg = self.source("pil", self.work / "bench_cache_pil")
        rows = source.rows(samples, "bench")  # warm after the cold row: no image decoded
        labels = torch.tensor([label for _, label in samples])
        params = [p for p in source.suffix.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg.train, params)
        loader = make_loader(
            TensorDataset(rows, labels),
            cfg.data.batch_size,
            device=self.device,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )
        sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        train_one_epoch(source.suffix, loader, nn.CrossEntropyLoss(), optimizer, self.device, source.precision)
        sync()
        started = time.perf_counter()
        train_one_epoch(source.suffix, loader, nn.CrossEntropyLoss(), optimizer, self.device, source.precision)
        sync()
        epoch = time.perf_counter() - started
        on_device = [(r.to(self.device), y.to(self.device)) for r, y in loader]
        started = time.perf_counter()
        for x, y in on_device:  # the same steps with the rows already on the device and no loader
            with torch.autocast(self.device.type, dtype=source.precision, enabled=source.precision is not None):
                loss = nn.functional.cross_entropy(source.suffix(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync()
        head = time.perf_counter() - started
        return epoch, (
            f"{len(rows)} rows in batches of {cfg.data.batch_size}: {epoch / head:.1f}x the head's own "
            f"compute ({head:.3f}s with the rows on the device, no loader)"
        )


def _state_dict(path: str):
    from vggft.config.schema import ModelConfig
    from vggft.model.pretrained import pretrained_state_dict

    return pretrained_state_dict(ModelConfig(weights=path))


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {name} ({os.cpu_count()} cores), no CUDA" if not torch.cuda.is_available() else f"CPU: {name}"


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="a few tiny images, vgg11 with the GAP head at 32 px")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here (rewritten after every row)")
    parser.add_argument("--weights", help="a local VGG state_dict for model.weights (default: random init)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: vggft's auto for CUDA, at least 2)")
    parser.add_argument("--workdir", type=Path, help="keep the generated data and runs here (default: a temp folder)")
    parser.add_argument("--only", default="", help="comma-separated words: run only rows whose name has one")
    parser.add_argument("--no-bench", action="store_true", help="the checks alone")
    parser.add_argument("--verbose", action="store_true", help="vggft's notes on stderr too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch
    import torchvision

    from vggft.utils.device import auto_workers, resolve_device
    from vggft.utils.errors import VggftError
    from vggft.utils.logs import log, set_progress

    try:
        device = resolve_device(args.device)
    except VggftError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    mode = TINY if args.tiny else FULL
    args.workers = args.workers if args.workers is not None else max(2, auto_workers(torch.device("cuda")))
    if args.workers < 2:
        print("--workers: the worker checks need at least 2", file=sys.stderr)
        return 2
    header = {
        "script": "scripts/gpu_check.py",
        "device": str(device),
        "device_name": _device_name(device),
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "mode": "tiny" if args.tiny else "full",
        "arch": mode.arch,
        "head": mode.head,
        "image_size": mode.image_size,
        "weights": args.weights or "random init",
        "workers": args.workers,
        "python": platform.python_version(),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    report = Report(header, args.out, {w.strip() for w in args.only.split(",") if w.strip()})
    notes = NotesHandler()
    log.addHandler(notes)
    if args.verbose:
        log.addHandler(logging.StreamHandler(sys.stderr))
    log.setLevel(logging.INFO)
    log.propagate = False
    set_progress(False)
    print(f"vggft gpu_check: {header['device_name']} ({device}), {header['mode']} mode", file=sys.stderr, flush=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vggft-gpu-check-"))
    try:
        from vggft.data.demo import make_demo_data

        make_demo_data(work / "data", mode.train_per_class, mode.test_per_class, size=mode.picture_px)
        check = GpuCheck(args, mode, device, work, report, notes)
        check.checks()
        if not args.no_bench:
            check.benchmarks()
    finally:
        log.removeHandler(notes)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    report.save()
    print(report.table())
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
