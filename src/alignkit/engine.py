"""The one training loop every algorithm shares, on `accelerate` (one CPU, one GPU, DDP, FSDP, DeepSpeed).

An algorithm supplies a stream of micro-batches and a loss that returns a *sum* over its units (target
tokens for SFT, pairs for DPO) plus the number of units in the batch. The engine divides by the number of
units in the whole optimiser step, counted across gradient-accumulation micro-batches and processes, so the
gradient is the same however the step is split: 2 processes × 1 micro-batch equals 1 process × 2.

Resume is exact: a checkpoint holds model, optimiser, scheduler and RNG states, and the data position is the
step itself (micro-batch streams are deterministic in the seed), so a killed run restarted with the same
command ends where an uninterrupted run ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from alignkit.config import SEEDS, Tracker, above, at_least, trackers_installed, within
from alignkit.data.builtin import builtin_path
from alignkit.errors import AlignkitError
from alignkit.io import file_digests, output_lock, sha256_of, write_json

T = TypeVar("T")
# A metric is a sum over the micro-batch, divided by the step's units when logged, or a (sum, count) pair,
# divided by its own count summed over the step (for quantities per sequence when the units are tokens).
MetricSums = dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor | float]]


@dataclass
class EngineConfig:
    """Options of the training loop shared by every algorithm."""

    output: str = ""
    """output directory: metrics.jsonl, checkpoints/, and the trained model under model/"""
    max_steps: int = at_least(0, 0)
    """optimiser steps to run; 0 means derive them from --epochs"""
    epochs: float = above(0, 1.0)
    """passes over the training data (used when --max-steps is 0)"""
    batch_size: int = at_least(1, 4)
    """sequences (or packed rows, or pairs) per micro-batch on each process"""
    grad_accum: int = at_least(1, 1)
    """micro-batches accumulated into one optimiser step"""
    lr: float = above(0, 2e-5)
    """peak learning rate of AdamW"""
    weight_decay: float = at_least(0, 0.0)
    """AdamW decoupled weight decay"""
    adam_betas: list[float] = within("[0, 1)", default_factory=lambda: [0.9, 0.999], count=2)
    """AdamW β1 and β2"""
    max_grad_norm: float = at_least(0, 1.0)
    """clip the global gradient norm to this value (0 turns clipping off)"""
    scheduler: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    """learning-rate schedule after warm-up; wsd is warmup-stable-decay (MiniCPM)"""
    warmup_ratio: float = within("[0, 1]", 0.05)
    """fraction of the steps spent warming the learning rate up linearly from 0"""
    decay_ratio: float = within("[0, 1]", 0.2)
    """wsd only: fraction of the steps in the final decay phase"""
    min_lr_ratio: float = within("[0, 1]", 0.0)
    """the learning rate decays to this fraction of --lr"""
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """mixed precision; auto picks bf16 on a GPU that has it and full precision on a CPU"""
    seed: int = within(SEEDS, 42)
    """seed of data order, initialisation and sampling"""
    log_every: int = at_least(1, 1)
    """log metrics every N steps"""
    save_every: int = at_least(0, 0)
    """write a checkpoint every N steps (0: only at the end); a rerun resumes from the latest"""
    keep_checkpoints: int = at_least(1, 1)
    """how many recent checkpoints to keep"""
    report_to: list[Tracker] = field(default_factory=list, metadata={"check": trackers_installed})
    """extra trackers through accelerate: tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio"""
    overwrite: bool = False
    """start afresh even if the output directory holds a checkpoint of another run"""
    progress: bool = True
    """show a progress bar"""
    resume_anyway: bool = False
    """resume even though a data file changed since the run began (run.json holds their hashes)"""

    # Fields that may differ between a run and its resumption without making it another run.
    RESUME_FREE = ("save_every", "log_every", "keep_checkpoints", "report_to", "overwrite", "progress", "resume_anyway")


class Loss(Protocol):
    def units(self, batch: Any) -> int:
        """How many units (tokens, pairs…) the batch's loss is a sum over."""

    def __call__(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, MetricSums]:
        """The summed loss of the micro-batch and metric sums (divided by the step's units for logging)."""


def pieces_of(loss_fn: Loss, batch: Any) -> Sequence[Any]:
    """The parts of a micro-batch that go forward and backward one at a time.

    A loss with a `pieces(batch)` method splits a micro-batch whose size is fixed by the algorithm (a GRPO
    rollout of prompts × K) into smaller passes: the summed loss, hence the gradient, is unchanged, and only
    one piece's activations are alive at once.
    """
    split = getattr(loss_fn, "pieces", None)
    return split(batch) if split is not None else (batch,)


class MicroBatches(Protocol):
    """A deterministic, endless stream of global micro-batches; `skip(n)` jumps ahead without collating."""

    def __iter__(self) -> Iterator[Any]: ...

    def skip(self, n: int) -> None: ...

    def per_epoch(self) -> int: ...


class Shuffled(Generic[T]):
    """Epoch after epoch over `items`, reshuffled per epoch from the seed, cut into micro-batches and collated."""

    def __init__(self, items: Sequence[T], batch_size: int, collate: Callable[[list[T]], Any], seed: int):
        if not items:
            raise AlignkitError("no training examples left", fix="check the data and --max-length")
        self.items, self.batch_size, self.collate, self.seed = items, batch_size, collate, seed
        self.position = 0

    def per_epoch(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)

    def _indices(self, position: int) -> list[int]:
        epoch, index = divmod(position, self.per_epoch())
        order = torch.randperm(len(self.items), generator=torch.Generator().manual_seed(self.seed + epoch))
        return order[index * self.batch_size : (index + 1) * self.batch_size].tolist()

    def served(self, n: int) -> set[int]:
        """Indices of the items the first `n` micro-batches take (all of them once `n` covers an epoch)."""
        if n >= self.per_epoch():
            return set(range(len(self.items)))
        return {i for position in range(n) for i in self._indices(position)}

    def skip(self, n: int) -> None:
        self.position += n

    def __iter__(self) -> Iterator[Any]:
        while True:
            indices = self._indices(self.position)
            self.position += 1
            yield self.collate([self.items[i] for i in indices])


class PhaseMix:
    """Two streams mixed by micro-batch: `second` is drawn with probability `ratio(index)`, else `first`.

    The draw for micro-batch g depends only on (seed, g), so the mix is reproducible and resumable.
    """

    def __init__(self, first: MicroBatches, second: MicroBatches, ratio: Callable[[int], float], seed: int):
        self.first, self.second, self.ratio, self.seed = first, second, ratio, seed
        self.position = 0

    def per_epoch(self) -> int:
        return self.first.per_epoch() + self.second.per_epoch()

    def takes_second(self, g: int) -> bool:
        return random.Random(self.seed * 1_000_003 + g).random() < self.ratio(g)

    def skip(self, n: int) -> None:
        picks = sum(self.takes_second(g) for g in range(self.position, self.position + n))
        self.second.skip(picks)
        self.first.skip(n - picks)
        self.position += n

    def __iter__(self) -> Iterator[Any]:
        first, second = iter(self.first), iter(self.second)
        while True:
            take_second = self.takes_second(self.position)
            self.position += 1
            yield next(second) if take_second else next(first)


def lr_multiplier(step: int, total: int, *, kind: str, warmup: int, decay_steps: int, min_ratio: float) -> float:
    """The factor applied to the peak learning rate during optimiser step `step` (0-based) of `total`.

    Warm-up rises linearly to 1 over `warmup` steps; then constant, linear or cosine decay towards
    `min_ratio` over the remaining steps, or for wsd (warmup-stable-decay) a plateau at 1 followed by a
    linear decay over the last `decay_steps`.
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "wsd":
        decay_start = total - decay_steps
        if step < decay_start:
            return 1.0
        return min_ratio + (1 - min_ratio) * (1 - (step - decay_start + 1) / (decay_steps + 1))
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown scheduler {kind!r}")


@functools.cache
def _glibc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl)
        return None


def release_freed_memory(device: torch.device) -> None:
    """Give freed memory back to the operating system, on a CPU run under glibc.

    glibc keeps freed heap memory for reuse, and the tensors of a step are freed in an order that leaves holes
    between the ones still alive: peak resident memory grows with the scattered remains of earlier passes. The
    engine calls `malloc_trim` before each backward pass (the forward's temporaries are gone) and after each
    optimiser step (the activations and gradients are gone). That lowers the peak at no measurable cost in
    speed (bench/README.md). GPU memory has its own caching allocator.
    """
    libc = _glibc() if device.type == "cpu" else None
    if libc is not None:
        libc.malloc_trim(0)


def peak_memory_mb() -> float:
    """Peak resident memory of this process (and peak CUDA memory where a GPU is used), in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        rss = max(rss, torch.cuda.max_memory_allocated() / 2**20)
    return rss


def reset_peak_memory() -> None:
    """Start `peak_memory_mb` afresh (Linux: resets the process's resident high-water mark), so that each stage
    of a pipeline, all run in one process, reports its own peak and not the largest one before it."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


@dataclass
class RunResult:
    steps: int
    final_loss: float
    tokens: int
    wall_s: float
    tokens_per_s: float
    peak_memory_mb: float
    resumed_from: int = 0
    status: str = "complete"


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def total_steps(config: EngineConfig, stream: MicroBatches, world_size: int) -> int:
    if config.max_steps > 0:
        return config.max_steps
    per_step = config.grad_accum * world_size
    return max(1, math.ceil(config.epochs * stream.per_epoch() / per_step))


def items_trained_on(config: EngineConfig, stream: Shuffled, world_size: int) -> set[int]:
    """Indices of the items of `stream` a run of `config` trains on: a short run over a large set takes a few."""
    return stream.served(total_steps(config, stream, world_size) * config.grad_accum * world_size)


class Checkpoints:
    """`OUTPUT/checkpoints/step-N/`, each written to a temporary name and renamed when complete, with a manifest
    of its files' sizes and sha256 that a resumed run checks before loading it."""

    MANIFEST = "manifest.json"

    def __init__(self, output: Path, keep: int, expected_bytes: int = 0):
        self.root = output / "checkpoints"
        self.keep = max(1, keep)
        # What a checkpoint takes on disk: an estimate until one is written, then that one's size.
        self.expected_bytes = expected_bytes

    def latest(self) -> tuple[int, Path] | None:
        done = [(step, p) for step, p in self._all() if (p / "trainer_state.json").exists()]
        return max(done) if done else None

    def save(self, accelerator: Accelerator, step: int, state: dict[str, Any]) -> Path:
        final = self.root / f"step-{step:07d}"
        tmp = self.root / f".tmp-step-{step:07d}"
        if accelerator.is_main_process:
            require_free_space(self.root.parent, self.expected_bytes, f"checkpoint step {step}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp), safe_serialization=False)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                write_json(tmp / "trainer_state.json", {"step": step, **state})
                manifest = {name: {"size": d["size"], "sha256": d["sha256"]} for name, d in file_digests(tmp, name="").items()}
                write_json(tmp / self.MANIFEST, manifest)
                self.expected_bytes = sum(d["size"] for d in manifest.values())
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                for _, old in sorted(self._all())[: -self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            # A full disk (or a kill signal turned exception) must not leave half a checkpoint to fill the disk.
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        accelerator.wait_for_everyone()
        return final

    def problem(self, path: Path) -> str | None:
        """What is wrong with the checkpoint at `path`, or None when every file is as its manifest says."""
        try:
            manifest = json.loads((path / self.MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            # Written before checkpoints had manifests: there is nothing to check it against, and refusing it
            # would strand every run interrupted before an upgrade.
            return None if (path / "trainer_state.json").is_file() else f"it has neither {self.MANIFEST} nor trainer_state.json"
        except (OSError, ValueError) as exc:
            return f"its {self.MANIFEST} is unreadable ({exc})"
        for name, written in manifest.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != written["size"]:
                return f"{name} has {file.stat().st_size} bytes where {written['size']} were written"
            if sha256_of(file) != written["sha256"]:
                return f"{name} is not what was written (its sha256 differs)"
        return None

    def resumable(self, log: Callable[[str], None]) -> tuple[int, Path] | None:
        """The newest checkpoint whose files match its manifest, each newer damaged one named in a warning;
        an error when there are checkpoints but none is intact."""
        damaged = []
        for step, path in sorted(self._all(), reverse=True):
            problem = self.problem(path)
            if problem is None:
                for bad, why in damaged:
                    log(f"warning: checkpoint {bad} is damaged ({why}); resuming from the intact {path} instead")
                return step, path
            damaged.append((path, problem))
        if damaged:
            raise AlignkitError(
                "no intact checkpoint to resume from: " + "; ".join(f"{p.name}: {why}" for p, why in damaged),
                where=str(self.root),
                fix="pass --overwrite to start afresh (or put the checkpoint's files back as they were written)",
            )
        return None

    def _all(self) -> list[tuple[int, Path]]:
        return [(int(p.name.split("-")[1]), p) for p in self.root.glob("step-*")] if self.root.is_dir() else []


def require_free_space(directory: Path, needed: int, what: str) -> None:
    """Refuse before writing rather than fail half-way: `needed` bytes must be free where `directory` is."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise AlignkitError(
            f"not enough disk space for {what}: it needs about {needed / 2**20:,.0f} MiB and {free / 2**20:,.0f} MiB are free",
            where=str(directory),
            fix="free some space (or use fewer --keep-checkpoints), then rerun the same command: "
            "it resumes from the last checkpoint",
        )


def saved_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """Rough bytes of the final model and of a checkpoint (weights, plus AdamW's two moments of each trainable
    weight), with a tenth more for the tokenizer, the RNG states and the file formats' overhead."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return int(1.1 * weights), int(1.1 * (weights + moments))


@contextlib.contextmanager
def disk_full_reported(output: Path) -> Iterator[None]:
    """A write that fails for want of space (ENOSPC, a quota, or torch's zip writer failing mid-file) ends the
    run with a message that says so and where it can resume, not an internal error."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        # torch reports ENOSPC inside torch.save as "[enforce fail at inline_container.cc:…] … file write failed".
        full = full or (isinstance(exc, RuntimeError) and "inline_container" in str(exc))
        if not full:
            raise
        free = shutil.disk_usage(output).free if output.exists() else 0
        kept = Checkpoints(output, 1).latest()
        raise AlignkitError(
            f"the disk is full ({free / 2**20:,.0f} MiB free): {str(exc).strip().splitlines()[0]}",
            where=str(output),
            fix="free some space, then rerun the same command: "
            + (f"it resumes from {kept[1]}" if kept else "it starts again (no checkpoint was kept; see --save-every)"),
        ) from None


def weights_finite(accelerator: Accelerator, model: torch.nn.Module) -> bool:
    """Whether every trainable weight on every process is finite: the loss is checked before each update, this
    after it, so a diverged last step is never saved."""
    flags = [torch.isfinite(p).all() for p in model.parameters() if p.requires_grad]
    bad = torch.stack(flags).logical_not().sum().float() if flags else torch.zeros((), device=accelerator.device)
    return accelerator.reduce(bad, "sum").item() == 0


def diverged(what: str, output: Path, checkpoints: Checkpoints) -> AlignkitError:
    kept = checkpoints.latest()
    return AlignkitError(
        what,
        where=str(output),
        fix=(f"the last good checkpoint is {kept[1]}; " if kept else "no checkpoint was kept; ")
        + "lower --lr, check the data, or use a smaller --max-grad-norm",
    )


# The options, across every algorithm's config, that name input data; each file behind them is hashed into
# run.json so that a resumed run can tell when its data changed under it.
DATA_OPTIONS = ("data", "eval_data", "mix_data", "prompts", "eval_prompts", "ptx_data")


def input_digests(config: Any, known: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Size, time and sha256 of every file the data options of `config` name (see `io.file_digests`)."""
    digests: dict[str, dict[str, Any]] = {}
    for option in DATA_OPTIONS:
        source = getattr(config, option, "")
        path = (builtin_path(source) or Path(source)) if source else None
        # A hub dataset name is no file here: its revision is the hub's to pin.
        if path is not None and path.exists():
            digests.update(file_digests(path, known, name=source))
    return digests


def run_fingerprint(algorithm: str, config: Any) -> dict[str, Any]:
    settings = {k: v for k, v in asdict(config).items() if k not in EngineConfig.RESUME_FREE}
    return {"algorithm": algorithm, "config": settings}


def _check_same_run(run_file: Path, fingerprint: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The run.json of the run this one continues (None for a fresh start), or an error if it is another run."""
    if overwrite or not run_file.exists():
        return None
    previous = json.loads(run_file.read_text(encoding="utf-8"))
    if {k: previous.get(k) for k in fingerprint} == json.loads(json.dumps(fingerprint, default=str)):
        return previous
    old, new = previous.get("config", {}), fingerprint["config"]
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
    if previous.get("algorithm") != fingerprint["algorithm"]:
        detail = f"algorithm {previous.get('algorithm')} -> {fingerprint['algorithm']}"
    raise AlignkitError(
        f"the output directory holds another run ({detail})",
        where=str(run_file.parent),
        fix="use a new --output, rerun with the same options to resume it, or pass --overwrite to start afresh there",
    )


def _check_same_data(
    before: dict[str, Any], now: dict[str, Any], output: Path, anyway: bool, log: Callable[[str], None]
) -> None:
    """Refuse to resume on data files that changed since the run began (or, with --resume-anyway, warn)."""
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k, {}).get("sha256") != now.get(k, {}).get("sha256"))
    if not changed:
        return
    names = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    if anyway:
        log(f"warning: resuming on changed data (--resume-anyway): {names}")
        return
    raise AlignkitError(
        f"the data changed since this run began: {names} (its sha256 differs from the one in run.json)",
        where=str(output),
        fix="put the data back as it was to resume, pass --overwrite to start afresh on the new data, "
        "or --resume-anyway to go on with it",
    )


def train(
    *,
    algorithm: str,
    config: EngineConfig,
    full_config: Any,
    model: torch.nn.Module,
    loss_fn: Loss,
    stream: MicroBatches,
    save_final: Callable[[torch.nn.Module, Path], None],
    accelerator: Accelerator | None = None,
    extra_summary: dict[str, Any] | None = None,
    checkpointed: Sequence[Any] = (),
    on_step: Callable[[int, int], None] | None = None,
) -> RunResult:
    """Run the optimisation to the end (or resume it), log metrics, checkpoint, and save the final model.

    `checkpointed` objects (with `state_dict` / `load_state_dict`, e.g. an adaptive KL controller) are saved
    in every checkpoint and restored on resume, with the model, optimiser, scheduler and RNG states.
    `on_step(step, total)` runs on the main process once before the first step (with 0, or the step a resumed
    run starts from) and after every optimiser step, before that step's checkpoint is written: a held-out
    evaluation there is on disk whenever the checkpoint is. It must leave the model and every RNG as it
    found them, or the run would train differently with it.
    """
    output = Path(config.output)
    accelerator = accelerator or make_accelerator(config)
    with output_lock(output), disk_full_reported(output):
        fingerprint = run_fingerprint(algorithm, full_config)
        run_file, summary_file, metrics_file = output / "run.json", output / "summary.json", output / "metrics.jsonl"
        if accelerator.is_main_process:
            output.mkdir(parents=True, exist_ok=True)
            previous = _check_same_run(run_file, fingerprint, config.overwrite)
            if config.overwrite:
                for stale in (output / "checkpoints", summary_file, metrics_file):
                    shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
            inputs = input_digests(full_config, (previous or {}).get("inputs", {}))
            # Only a run that would go on from where it stopped (or report itself done) needs the same data.
            if previous is not None and "inputs" in previous and (summary_file.exists() or Checkpoints(output, 1).latest()):
                _check_same_data(previous["inputs"], inputs, output, config.resume_anyway, accelerator.print)
            write_json(run_file, {**fingerprint, "inputs": inputs})
        accelerator.wait_for_everyone()

        if summary_file.exists():
            summary = json.loads(summary_file.read_text(encoding="utf-8"))
            if summary.get("status") == "complete":
                accelerator.print(f"{output} already holds a complete run; nothing to do (--overwrite starts afresh)")
                return RunResult(**{k: summary[k] for k in RunResult.__dataclass_fields__ if k in summary})

        steps = total_steps(config, stream, accelerator.num_processes)
        trainable = [p for p in model.parameters() if p.requires_grad]
        # The fused kernel updates each tensor in one pass with no temporaries: several times faster than the
        # default foreach path on a CPU.
        optimizer = torch.optim.AdamW(
            trainable, lr=config.lr, betas=tuple(config.adam_betas), weight_decay=config.weight_decay, fused=True
        )
        warmup = round(config.warmup_ratio * steps)
        decay = round(config.decay_ratio * steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_multiplier(
                s, steps, kind=config.scheduler, warmup=warmup, decay_steps=decay, min_ratio=config.min_lr_ratio
            ),
        )
        # The scheduler steps once per optimiser step on every process, so accelerate must not scale it.
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

        if checkpointed:
            accelerator.register_for_checkpointing(*checkpointed)
        final_bytes, checkpoint_bytes = saved_bytes(model)
        checkpoints = Checkpoints(output, config.keep_checkpoints, checkpoint_bytes)
        if accelerator.is_main_process:
            # Checked now as well as before each save, so a short disk fails the run before it trains, not after.
            require_free_space(output, final_bytes, "the final model")
            if config.save_every:
                require_free_space(output, checkpoint_bytes, "a checkpoint")
        start, tokens_total = 0, 0
        latest = broadcast_object_list([checkpoints.resumable(accelerator.print) if accelerator.is_main_process else None])[0]
        if latest is not None:
            start, path = latest
            accelerator.load_state(str(path))
            tokens_total = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))["tokens"]
            accelerator.print(f"resuming from {path} (step {start} of {steps})")
        if accelerator.is_main_process:
            _truncate_metrics(metrics_file, start)
        if on_step is not None and accelerator.is_main_process:
            on_step(start, steps)
        per_step = config.grad_accum * accelerator.num_processes
        stream.skip(start * per_step)
        batches = iter(stream)

        if config.report_to:
            accelerator.init_trackers(algorithm, config=_flat_config(full_config))
        bar = tqdm(total=steps, initial=start, disable=not (config.progress and accelerator.is_main_process), desc=algorithm)
        session_tokens = 0
        last_loss = math.nan
        started = time.perf_counter()
        window_start, window_tokens = started, 0
        model.train()
        for step in range(start, steps):
            # Each process takes every num_processes-th global micro-batch: the split does not change the data.
            local = []
            for k in range(per_step):
                batch = next(batches)
                if k % accelerator.num_processes == accelerator.process_index:
                    local.append(batch)
            units = torch.tensor(float(sum(loss_fn.units(b) for b in local)), device=accelerator.device)
            tokens = torch.tensor(float(sum(b.n_tokens for b in local)), device=accelerator.device)
            units, tokens = accelerator.reduce(units, "sum"), accelerator.reduce(tokens, "sum")
            # DDP averages gradients over processes; scaling by world size makes the result a plain sum / units.
            scale = accelerator.num_processes / max(units.item(), 1.0)
            sums: dict[str, torch.Tensor] = {}
            counts: dict[str, torch.Tensor] = {}
            passes = [piece for batch in local for piece in pieces_of(loss_fn, batch)]
            for i, piece in enumerate(passes):
                piece = piece.to(accelerator.device)
                sync = accelerator.no_sync(model) if i < len(passes) - 1 else contextlib.nullcontext()
                with sync, accelerator.autocast():
                    loss_sum, metrics = loss_fn(model, piece)
                    release_freed_memory(accelerator.device)  # the forward's temporaries, before the backward's own
                    accelerator.backward(loss_sum * scale)
                for name, value in {"loss": loss_sum, **metrics}.items():
                    total, count = value if isinstance(value, tuple) else (value, None)
                    sums[name] = sums.get(name, 0.0) + total.detach().float()
                    if count is not None:
                        counts[name] = counts.get(name, 0.0) + torch.as_tensor(count, dtype=torch.float32)
            grad_norm = (
                accelerator.clip_grad_norm_(trainable, config.max_grad_norm) if config.max_grad_norm > 0 else None
            )
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            release_freed_memory(accelerator.device)

            logged = _reduce_metrics(accelerator, sums, counts, units)
            last_loss = logged["loss"]
            if not math.isfinite(last_loss):
                raise diverged(f"the loss became {last_loss} at step {step + 1}", output, checkpoints)
            tokens_total += int(tokens.item())
            session_tokens += int(tokens.item())
            window_tokens += int(tokens.item())
            done = step + 1
            bar.update(1)
            if done % config.log_every == 0 or done == steps:
                now = time.perf_counter()
                record = {
                    "step": done,
                    "loss": last_loss,
                    "lr": lr,
                    "tokens": tokens_total,
                    "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                    "units": units.item(),
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                    "elapsed_s": now - started,
                    **{k: v for k, v in logged.items() if k != "loss"},
                }
                window_start, window_tokens = now, 0
                bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if accelerator.is_main_process:
                    with metrics_file.open("a", encoding="utf-8") as handle:
                        handle.write(json.dumps(record) + "\n")
                if config.report_to:
                    accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=done)
            if on_step is not None and accelerator.is_main_process:
                on_step(done, steps)
            if config.save_every and done % config.save_every == 0 and done < steps:
                if not weights_finite(accelerator, model):
                    what = f"the weights hold inf or NaN after step {done}; checkpoint step {done} was not written"
                    raise diverged(what, output, checkpoints)
                checkpoints.save(accelerator, done, {"tokens": tokens_total})
        bar.close()
        wall = time.perf_counter() - started
        if not weights_finite(accelerator, model):
            raise diverged(f"the weights hold inf or NaN after the last step ({steps}); no model was saved", output, checkpoints)

        accelerator.wait_for_everyone()
        unwrapped = accelerator.unwrap_model(model)
        result = RunResult(
            steps=steps,
            final_loss=last_loss,
            tokens=tokens_total,
            wall_s=wall,
            tokens_per_s=session_tokens / max(wall, 1e-9),
            peak_memory_mb=peak_memory_mb(),
            resumed_from=start,
        )
        if accelerator.is_main_process:
            require_free_space(output, final_bytes, "the final model")
            save_final(unwrapped, output)
            write_json(summary_file, {**asdict(result), **(extra_summary or {})})
            shutil.rmtree(output / "checkpoints", ignore_errors=True)  # the final model supersedes them
        if config.report_to:
            accelerator.end_training()
        accelerator.wait_for_everyone()
        return result


def make_accelerator(config: EngineConfig) -> Accelerator:
    set_seed(config.seed)
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    if not has_accelerator:
        # transformers repeats the grouped K/V heads before sdpa whenever there is a mask, for the sake of
        # CUDA kernels; the CPU kernel takes them grouped, masked or not, which saves the copies (memory in
        # training, a copy of the whole KV cache per decoding step). A user's own setting wins.
        os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    return Accelerator(
        # On a machine without an accelerator, processes started by `accelerate launch --multi_gpu` (torchrun)
        # only join one DDP group over gloo when accelerate is told it runs on CPU.
        cpu=not has_accelerator,
        mixed_precision=_mixed_precision(config.precision),
        log_with=config.report_to or None,
        project_dir=config.output,
        step_scheduler_with_optimizer=False,
    )


def _truncate_metrics(metrics_file: Path, upto: int) -> None:
    """Drop log lines past the checkpoint being resumed, so the log reads like one uninterrupted run."""
    if not metrics_file.exists():
        return
    lines = metrics_file.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= upto]
    tmp = metrics_file.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, metrics_file)


def _reduce_metrics(
    accelerator: Accelerator, sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor], units: torch.Tensor
) -> dict[str, float]:
    """Step means of the metrics over all processes: each sum over its own count, or over the units."""
    names = sorted(sums)
    totals = torch.stack([sums[n] for n in names] + [counts.get(n, units.new_zeros(())) for n in names])
    totals = accelerator.reduce(totals.to(accelerator.device), "sum")
    logged = {}
    for i, name in enumerate(names):
        denominator = totals[len(names) + i] if name in counts else units
        logged[name] = (totals[i] / max(denominator.item(), 1.0)).item()
    return logged


def _flat_config(config: Any) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in asdict(config).items()}
