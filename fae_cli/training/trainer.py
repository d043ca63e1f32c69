"""The one training loop of every `train-*` stage.

A stage describes what to train as a `TrainTask` (the model, how to fetch a batch, the loss)
and hands it to `Trainer` with the stage's `OptimConfig`. The trainer owns the rest:
- AdamW with weight-decay groups, the LR schedule (linear warm-up, then cosine or constant),
  gradient-norm clipping, an EMA of the model and exact gradient accumulation;
- bf16 autocast and torch.compile on CUDA, DDP under torchrun, the data order;
- checkpoints every `checkpoint_every` steps, at the end and on SIGTERM/SIGINT, and automatic
  resume from `<run_dir>/checkpoints/latest`;
- a guard that stops on a non-finite loss or gradient, metrics as JSON lines in
  `<run_dir>/metrics.jsonl`, a rich progress bar and a periodic evaluation hook;
- an optional auxiliary model (a GAN discriminator) with its own optimizer.

Example, a stage that trains a VAE on a feature cache::

    class AdapterTask(TrainTask):
        kind = "adapter"                      # checkpoint kind, checked on resume and load

        def __init__(self, model, cache):
            self.model = model                # trained, EMA'd, saved as model.safetensors
            self.cache = cache

        def __len__(self):                    # dataset size: indices are 0 .. len - 1
            return len(self.cache)

        def fetch(self, indices):             # LongTensor of indices -> batch (CPU tensors)
            return self.cache.get(indices)

        def loss(self, model, x, step):       # mean over the micro-batch's samples
            x_hat, mean, logvar = model(x)
            mse = F.mse_loss(x_hat, x)
            kl = kl_divergence(mean, logvar)
            return mse + 1e-6 * kl, {"mse": mse, "kl": kl}

        def evaluate(self, model, ema, step):  # optional: floats to log, no_grad, eval mode
            return {"holdout_mse": ...}

    env = init_distributed(recipe.run.device)
    task = AdapterTask(model, cache)
    trainer = Trainer(task, recipe.adapter.train, run_dir, seed=recipe.run.seed, env=env,
                      identity={"features": cache_hash}, metadata={"fae.adapter": config},
                      recipe_toml=to_toml(recipe), recipe_key="adapter.train")
    result = trainer.fit()   # run the same command again after a stop: it resumes

Contract of a task:
- `loss(model, batch, step)` returns the mean of per-sample losses over the micro-batch and a
  dict of metrics (floats or 0-dim tensors; tensors avoid a device sync per step). The trainer
  weights each micro-batch by its share of the global batch, so any split over ranks and
  micro-batches gives the gradient of one batch of `batch_size`. `model` is the wrapped model
  (DDP, compiled); call it, and use `trainer.model` or the task's own reference for attributes.
- Random draws inside `loss` (noise, times, label drop) use torch's global RNG, which the
  trainer seeds before every micro-batch from (seed, step, rank, micro-batch): a resumed run
  draws exactly what an uninterrupted one would.
- `fetch` must return the same batch for the same indices; with `workers > 0` it runs in
  DataLoader worker processes. Tensors in the batch (also inside tuples, lists, dicts) are
  moved to the device by the trainer.
- Frozen networks the loss needs (a perceptual encoder) live on the task, not inside `model`,
  so that the EMA and checkpoints hold only trained weights. Build them on `env.device`.
- An `Auxiliary` (a GAN discriminator) is trained in the same step: for each micro-batch the
  trainer runs the main loss with the auxiliary model's parameters frozen, then the auxiliary
  loss `aux.loss(aux_model, batch, step)`. The main loss can leave tensors for it on the task
  (e.g. `self.fake = x_hat.detach()`); they must be detached, since the auxiliary backward must
  not reach the main model. Both start at `start_step`; the task's main loss checks the step
  to add its own auxiliary term.
- `identity` contains the facts that define the run besides the optimisation settings (model
  config, dataset identity); a folder trained with other facts is rejected on resume with the
  differing keys named. Fields that only change how a run is operated (`OPERATIONAL_FIELDS`)
  may change between a run and its resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fae_cli.artifacts import atomic_write_text, describe_changes
from fae_cli.errors import FaeError
from fae_cli.log import console
from fae_cli.recipe import OptimConfig
from fae_cli.training.checkpoint import (
    CHECKPOINTS,
    deduplicate,
    latest_checkpoint,
    load_checkpoint,
    model_state,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_checkpoint_header,
    save_checkpoint,
)
from fae_cli.training.distributed import DistEnv, barrier, sample_seed
from fae_cli.training.ema import EMA
from fae_cli.training.optim import build_adamw, lr_at, set_lr
from fae_cli.training.order import DataOrder, micro_batches

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# Seconds between redraws of the progress bar. Rich's own 10 Hz refresh thread cost about 10% of
# a 0.3 s CPU step in benchmarks/trainer_overhead.py (2-core shared machine).
PROGRESS_REDRAW_S = 1.0

# OptimConfig fields that change how a run is operated, not what it computes: they may differ
# between a run and its resume.
OPERATIONAL_FIELDS = ("workers", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "compile")

# Independent random streams derived from the run seed.
_DATA_STREAM = 1
_STEP_STREAM = 2


class TrainingInterrupted(FaeError):
    """Training stopped on a signal or request after writing a checkpoint; rerunning resumes it."""


# Exit status of a run stopped by `request_stop` rather than a signal: EX_TEMPFAIL, "try again".
REQUESTED_STOP_EXIT = 75


def _stop_exit_code(reason: str | None) -> int:
    """Return 128 + the signal number for SIGTERM or SIGINT, as shells report them, else 75."""
    try:
        return 128 + int(signal.Signals[reason or ""])
    except KeyError:
        return REQUESTED_STOP_EXIT


@dataclass
class Auxiliary:
    """A second model trained in the same steps with its own AdamW, e.g. a GAN discriminator."""

    model: nn.Module
    loss: Callable[[nn.Module, Any, int], tuple[torch.Tensor, dict[str, Any]]]
    optim: OptimConfig  # learning rate, betas, weight decay, schedule, warm-up and clipping
    start_step: int = 0  # first optimiser step (0-based) at which the auxiliary loss runs


class TrainTask:
    """Description of a stage's training: the model, a dataset of `len(task)` samples, the loss."""

    kind: str = ""
    model: nn.Module
    auxiliary: Auxiliary | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def fetch(self, indices: torch.Tensor) -> Any:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, ema: nn.Module, step: int) -> dict[str, float]:
        """Return metrics of the model and its EMA at `step`; called under no_grad in eval mode."""
        return {}


@dataclass
class TrainResult:
    """Outcome of a `fit`: the step reached, last checkpoint, last logged metrics, final evaluation."""

    step: int
    checkpoint: Path
    resumed_from: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, float] = field(default_factory=dict)


@dataclass
class MicroResult:
    """Loss and metrics of one micro-batch of `count` samples (device tensors, not yet synced)."""

    count: int
    values: dict[str, torch.Tensor]


@dataclass
class StepResult:
    """One optimiser update: its micro-batches, the gradient norm before clipping, the LR used."""

    micro: list[MicroResult]
    grad_norm: torch.Tensor
    lr: float
    stop: bool  # a stop was requested on some rank; the loop checkpoints and ends


class _Fetcher(torch.utils.data.Dataset):
    """Map-style dataset whose keys are whole micro-batches of indices (DataLoader workers)."""

    def __init__(self, task: TrainTask) -> None:
        self.task = task

    def __getitem__(self, indices: torch.Tensor) -> Any:
        return self.task.fetch(indices)


class Trainer:
    """Train `task.model` with the settings of `optim`, writing into `run_dir` (see module doc)."""

    def __init__(
        self,
        task: TrainTask,
        optim: OptimConfig,
        run_dir: str | Path,
        *,
        seed: int,
        env: DistEnv | None = None,
        identity: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        recipe_toml: str | None = None,
        recipe_key: str = "train",
        progress: bool = True,
    ) -> None:
        if not task.kind:
            raise ValueError("a TrainTask needs a checkpoint kind, e.g. 'adapter'")
        self.task = task
        self.optim = optim
        self.run_dir = Path(run_dir)
        self.seed = seed
        self.env = env or DistEnv()
        self.metadata = dict(metadata or {})
        self.recipe_toml = recipe_toml
        self.recipe_key = recipe_key
        self.show_progress = progress and self.env.is_main
        settings = {key: value for key, value in optim.model_dump(mode="json").items() if key not in OPERATIONAL_FIELDS}
        # Settings sit under the recipe key, so a mismatch names the recipe field (adapter.train.steps).
        identity = {**(identity or {}), "kind": task.kind, "seed": seed, "samples": len(task), recipe_key: settings}
        if task.auxiliary is not None:
            aux_settings = task.auxiliary.optim.model_dump(mode="json")
            identity["auxiliary"] = {"start_step": task.auxiliary.start_step, "optim": aux_settings}
        # A JSON round trip makes tuples lists, as they come back from a checkpoint header.
        self.identity = json.loads(json.dumps(identity))

        self.step = 0
        self.resumed_from: int | None = None
        self.last_checkpoint: Path | None = None
        self._stop_reason: str | None = None
        self._saved_step = -1
        self._ready = False
        self._step_seed = sample_seed(seed, _STEP_STREAM)

    @property
    def device(self) -> torch.device:
        return self.env.device

    # ------------------------------------------------------------------------------------------
    # Setup and resume

    def setup(self) -> None:
        """Move the models to the device, build optimizers and EMA, resume, wrap for DDP/compile."""
        if self._ready:
            return
        optim = self.optim
        world = self.env.world_size
        if optim.batch_size < world * optim.grad_accum:
            raise FaeError(
                f"{self.recipe_key}.batch_size = {optim.batch_size} is smaller than {world} ranks x "
                f"{optim.grad_accum} micro-batches; raise the batch size or lower grad_accum"
            )
        if len(self.task) < optim.batch_size:
            raise FaeError(f"the dataset has {len(self.task)} samples, fewer than {self.recipe_key}.batch_size = {optim.batch_size}; lower the batch size")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.model = self.task.model.to(self.device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = EMA(self.model, optim.ema_decay)
        self.optimizer = build_adamw(self.model, optim, self.device)
        self.aux = self.task.auxiliary
        if self.aux is not None:
            self.aux.model.to(self.device).train()
            self.aux_params = [p for p in self.aux.model.parameters() if p.requires_grad]
            self.aux_optimizer = build_adamw(self.aux.model, self.aux.optim, self.device)
        self.order = DataOrder(len(self.task), optim.batch_size, sample_seed(self.seed, _DATA_STREAM))

        self.resumed_from = self._resume()
        self.train_model = self._wrap(self.model)
        self.train_aux = self._wrap(self.aux.model) if self.aux is not None else None
        self._ready = True

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.env.distributed:
            device_ids = [self.device] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids)
        if self.optim.compile and self.device.type == "cuda":
            # NOTE: compiled training has not run on a GPU in fae's own tests (CPU-only CI).
            model = torch.compile(model)
        return model

    def _resume(self) -> int | None:
        folder = latest_checkpoint(self.run_dir)
        if folder is None:
            return None
        self._check_identity(read_checkpoint_header(folder), folder)
        checkpoint = load_checkpoint(
            folder,
            expect_kind=self.task.kind,
            model=self.model,
            ema=self.ema.module,
            optimizer=self.optimizer,
            restore_rng_state=True,
        )
        self.step = checkpoint.step
        data = checkpoint.extra["data"]
        self.order.epoch = int(data["epoch"])
        self.order.offset = int(data["offset"])
        if self.aux is not None:
            self._load_auxiliary(checkpoint.extra, checkpoint.extra_tensors)
        self.last_checkpoint = folder
        self._saved_step = self.step
        if self.env.is_main:
            self._truncate_metrics(self.step)
        parts = "model, EMA, optimizer, data position" + (", auxiliary model" if self.aux is not None else "")
        log.info("resumed from step %d of %d (%s) in %s", self.step, self.optim.steps, parts, folder)
        return self.step

    def _check_identity(self, header: dict[str, Any], folder: Path) -> None:
        stored = header.get("fae.identity")
        if stored == self.identity:
            return
        changes = describe_changes(stored if isinstance(stored, dict) else {}, self.identity)
        raise FaeError(
            f"{self.run_dir} contains a {self.task.kind} run trained with other settings ({changes}); "
            f"rerun with the settings of {folder.name}, or write to another folder (--out or run.name)"
        )

    def _load_auxiliary(self, extra: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        assert self.aux is not None
        prefix = "aux.model."
        state = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        for alias, stored in extra["aux_aliases"].items():
            state[alias] = state[stored]
        self.aux.model.load_state_dict(state, strict=True)
        optimizer_tensors = {key[len("aux.") :]: value for key, value in tensors.items() if key.startswith("aux.optimizer.")}
        self.aux_optimizer.load_state_dict(optimizer_from_tensors(optimizer_tensors, extra["aux_optimizer"]))

    # ------------------------------------------------------------------------------------------
    # The loop

    def fit(self) -> TrainResult:
        """Train until `optim.steps`, resuming from the run folder; evaluate once at the end.

        Raises `TrainingInterrupted` (a FaeError) after writing a checkpoint when SIGTERM or
        SIGINT arrives; a second SIGINT aborts at once.
        """
        self.setup()
        previous = self._install_signal_handlers()
        try:
            metrics = self._train()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        evaluation = self.evaluate()
        assert self.last_checkpoint is not None
        return TrainResult(self.step, self.last_checkpoint, self.resumed_from, metrics, evaluation)

    def request_stop(self, reason: str = "request") -> None:
        """Stop after the current step, writing a checkpoint (what SIGTERM and SIGINT do)."""
        self._stop_reason = reason

    def _train(self) -> dict[str, float]:
        optim = self.optim
        if self.step >= optim.steps:
            log.info("%s already trained to step %d of %d", self.task.kind, self.step, optim.steps)
            return {}
        world, accum = self.env.world_size, optim.grad_accum
        if self.resumed_from is None:
            log.info(
                "training %s for %d steps: batch %d (%d ranks x %d micro-batches), peak LR %.3g, %s schedule",
                self.task.kind, optim.steps, optim.batch_size, world, accum, optim.learning_rate, optim.schedule,
            )
        stream = self._batch_stream()
        window = _Window(self.device)
        metrics: dict[str, float] = {}
        with self._progress() as progress:
            bar = progress.add_task(self.task.kind, total=optim.steps, completed=self.step, loss="-", speed="-")
            drawn = time.perf_counter()
            while self.step < optim.steps:
                step = self.step
                parts = micro_batches(self.order.next_batch(), self.env.rank, world, accum)
                micro = [(len(part), next(stream)) for part in parts]
                result = self.train_step(micro, step)
                window.add(result, optim.batch_size)
                done = step + 1

                if done % optim.log_every == 0 or done == optim.steps or result.stop:
                    metrics = self._log(window, done)
                    progress.update(bar, loss=f"{metrics['loss']:.4g}", speed=f"{metrics['samples_per_s']:.1f}")
                    if self.env.is_main and not (self.show_progress and console.is_terminal):
                        # No live bar (a log file, a pipe, a batch job): one line per log interval.
                        log.info(
                            "%s step %d/%d: loss %.4g, %.1f samples/s",
                            self.task.kind, done, optim.steps, metrics["loss"], metrics["samples_per_s"],
                        )
                progress.update(bar, completed=done)
                if time.perf_counter() - drawn >= PROGRESS_REDRAW_S or done == optim.steps:
                    progress.refresh()
                    drawn = time.perf_counter()
                if optim.eval_every and done % optim.eval_every == 0 and done != optim.steps:
                    self.evaluate()
                if done % optim.checkpoint_every == 0 or done == optim.steps:
                    self.save()
                if result.stop:
                    if self._saved_step != done:
                        self.save()
                    raise TrainingInterrupted(
                        f"training stopped by {self._stop_reason} after step {done} of {optim.steps}; "
                        f"checkpoint written to {self.last_checkpoint}; run the same command again to resume",
                        exit_code=_stop_exit_code(self._stop_reason),
                    )
        return metrics

    def train_step(self, micro: list[tuple[int, Any]], step: int) -> StepResult:
        """Run optimiser update `step` (0-based) on this rank's micro-batches [(size, batch), ...]."""
        lr = lr_at(step, self.optim)
        set_lr(self.optimizer, lr)
        aux_active = self.aux is not None and step >= self.aux.start_step
        if aux_active:
            assert self.aux is not None
            set_lr(self.aux_optimizer, lr_at(step - self.aux.start_step, self.aux.optim))

        results = self.forward_backward(micro, step)
        grad_norm = _clip(self.params, self.optim.grad_clip, self.device)
        aux_norm = _clip(self.aux_params, self.aux.optim.grad_clip, self.device) if aux_active and self.aux else None
        stop = self._guard(step, results, grad_norm, aux_norm)

        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if aux_active:
            self.aux_optimizer.step()
            self.aux_optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        self.step = step + 1
        return StepResult(results, grad_norm, lr, stop)

    def forward_backward(self, micro: list[tuple[int, Any]], step: int) -> list[MicroResult]:
        """Accumulate into `.grad` the gradient of the global batch's mean loss over `micro`.

        Each micro-batch's mean loss is weighted by size * world_size / batch_size: DDP averages
        gradients over ranks, so the sum over ranks and micro-batches is the global batch mean.
        """
        self.setup()
        world = self.env.world_size
        aux_active = self.aux is not None and step >= self.aux.start_step
        results = []
        for index, (count, batch) in enumerate(micro):
            batch = _to_device(batch, self.device)
            weight = count * world / self.optim.batch_size
            sync = index == len(micro) - 1
            torch.manual_seed(sample_seed(self._step_seed, (step * world + self.env.rank) * len(micro) + index))

            if self.aux is not None:
                for param in self.aux_params:
                    param.requires_grad_(False)
            with self._no_sync(self.train_model, sync):
                with self._autocast():
                    loss, metrics = self.task.loss(self.train_model, batch, step)
                (loss.float() * weight).backward()
            values = {"loss": loss.detach().float(), **{key: _as_tensor(value, self.device) for key, value in metrics.items()}}

            if aux_active:
                assert self.aux is not None and self.train_aux is not None
                for param in self.aux_params:
                    param.requires_grad_(True)
                with self._no_sync(self.train_aux, sync):
                    with self._autocast():
                        aux_loss, aux_metrics = self.aux.loss(self.train_aux, batch, step)
                    (aux_loss.float() * weight).backward()
                values["aux_loss"] = aux_loss.detach().float()
                values.update({key: _as_tensor(value, self.device) for key, value in aux_metrics.items()})
            results.append(MicroResult(count, values))
        return results

    def accumulate(self, indices: torch.Tensor, step: int | None = None) -> list[MicroResult]:
        """Split a global batch of dataset indices like the loop does, fetch it, and run `forward_backward`."""
        self.setup()
        parts = micro_batches(indices, self.env.rank, self.env.world_size, self.optim.grad_accum)
        micro = [(len(part), self.task.fetch(part)) for part in parts]
        return self.forward_backward(micro, self.step if step is None else step)

    # ------------------------------------------------------------------------------------------
    # Guard, distributed flags, contexts

    def _guard(self, step: int, results: list[MicroResult], grad_norm: torch.Tensor, aux_norm: torch.Tensor | None) -> bool:
        """Raise a FaeError naming the step and term when a loss or gradient is not finite on any rank.

        Returns whether a stop was requested on any rank; both flags travel in one all-reduce.
        """
        finite = torch.isfinite(grad_norm)
        for result in results:
            finite = finite & torch.isfinite(result.values["loss"])
            if "aux_loss" in result.values:
                finite = finite & torch.isfinite(result.values["aux_loss"])
        if aux_norm is not None:
            finite = finite & torch.isfinite(aux_norm)
        nonfinite, stop = self._sync_flags(not bool(finite.item()), self._stop_reason is not None)
        if not nonfinite:
            return stop

        what = "the gradient norm is not finite (a non-finite value on another rank, or in the backward pass)"
        for index, result in enumerate(results):
            bad = [(key, value.item()) for key, value in result.values.items() if not torch.isfinite(value).all()]
            # Name a task's own term before the totals it adds up to.
            bad.sort(key=lambda item: item[0] in ("loss", "aux_loss"))
            if bad:
                key, value = bad[0]
                what = f"loss term '{key}' is {value} in micro-batch {index + 1} of {len(results)}"
                break
        else:
            if aux_norm is not None and not torch.isfinite(aux_norm):
                what = "the auxiliary model's gradient norm is not finite"
        last = self.last_checkpoint or "none yet"
        raise FaeError(
            f"training stopped at step {step + 1}: {what}; the weights were not updated and the "
            f"last checkpoint is {last}; lower {self.recipe_key}.learning_rate or check the input data"
        )

    def _sync_flags(self, *flags: bool) -> tuple[bool, ...]:
        """Return each flag OR-ed over ranks (every rank must call this at the same point)."""
        if not self.env.distributed:
            return flags
        device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        values = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return tuple(bool(value > 0) for value in values.tolist())

    def _no_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
        if not sync and self.env.distributed:
            inner = getattr(model, "_orig_mod", model)
            if isinstance(inner, DistributedDataParallel):
                return inner.no_sync()
        return contextlib.nullcontext()

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda" and self.optim.precision == "bf16":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._stop_reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        log.warning("%s received: stopping after the current step and writing a checkpoint", name)
        self._stop_reason = name

    # ------------------------------------------------------------------------------------------
    # Data

    def _batch_stream(self) -> Iterator[Any]:
        """Yield this rank's fetched micro-batches from the current position to the last step."""
        order = self.order.copy()
        rank, world, accum = self.env.rank, self.env.world_size, self.optim.grad_accum

        def keys() -> Iterator[torch.Tensor]:
            for _ in range(self.step, self.optim.steps):
                yield from micro_batches(order.next_batch(), rank, world, accum)

        if self.optim.workers == 0:
            for indices in keys():
                yield self.task.fetch(indices)
            return
        loader = torch.utils.data.DataLoader(
            _Fetcher(self.task),
            batch_size=None,
            sampler=keys(),
            num_workers=self.optim.workers,
            pin_memory=self.device.type == "cuda",
        )
        yield from loader

    # ------------------------------------------------------------------------------------------
    # Checkpoints, evaluation, metrics

    def save(self) -> Path:
        """Write a checkpoint of the current step (rank 0 writes, every rank waits)."""
        name = f"step-{self.step:08d}"
        if self.env.is_main:
            extra: dict[str, Any] = {"data": self.order.state()}
            extra_tensors: dict[str, torch.Tensor] = {}
            if self.aux is not None:
                unique, aliases = deduplicate(model_state(self.aux.model))
                extra_tensors.update({f"aux.model.{key}": value for key, value in unique.items()})
                extra["aux_aliases"] = aliases
                optimizer_tensors, optimizer_meta = optimizer_to_tensors(self.aux_optimizer)
                extra_tensors.update({f"aux.{key}": value for key, value in optimizer_tensors.items()})
                extra["aux_optimizer"] = optimizer_meta
            save_checkpoint(
                self.run_dir,
                kind=self.task.kind,
                step=self.step,
                model=self.model,
                ema=self.ema.module,
                optimizer=self.optimizer,
                extra=extra,
                extra_tensors=extra_tensors,
                metadata={**self.metadata, "fae.identity": self.identity},
                recipe_toml=self.recipe_toml,
                keep=self.optim.keep_checkpoints,
            )
            log.info("checkpoint: step %d -> %s", self.step, self.run_dir / CHECKPOINTS / name)
        barrier()
        self.last_checkpoint = self.run_dir / CHECKPOINTS / name
        self._saved_step = self.step
        return self.last_checkpoint

    def evaluate(self) -> dict[str, float]:
        """Run the task's evaluation on the model and EMA, log it and return it."""
        self.setup()
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            results = self.task.evaluate(self.model, self.ema.module, self.step)
        self.model.train(was_training)
        results = {key: float(value) for key, value in results.items()}
        if results and self.env.is_main:
            self._append_metrics({"step": self.step, "eval": results})
            shown = ", ".join(f"{key} {value:.4g}" for key, value in results.items())
            log.info("evaluation at step %d: %s", self.step, shown)
        return results

    def _log(self, window: _Window, step: int) -> dict[str, float]:
        metrics = window.reduce(self.env)
        metrics = {"step": step, **metrics}
        if self.env.is_main:
            self._append_metrics(metrics)
        window.reset()
        return metrics

    def _append_metrics(self, record: dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint being resumed, so steps do not repeat."""
        path = self.run_dir / METRICS_FILE
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if int(record["step"]) <= step:
                kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} samples/s"),
            TimeRemainingColumn(),
            console=console,
            auto_refresh=False,
            disable=not self.show_progress,
        )


class _Window:
    """Sums of metrics between two log lines, reduced over ranks when logged."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.samples = 0
        self.steps = 0
        self.grad_norm = torch.zeros((), device=self.device)
        self.lr = 0.0
        self.global_samples = 0
        self.start = time.perf_counter()

    def add(self, step: StepResult, global_batch: int) -> None:
        for result in step.micro:
            for key, value in result.values.items():
                weighted = value.detach().float() * result.count
                self.sums[key] = self.sums[key] + weighted if key in self.sums else weighted
            self.samples += result.count
        self.grad_norm = self.grad_norm + step.grad_norm.detach().float()
        self.lr = step.lr
        self.steps += 1
        self.global_samples += global_batch

    def reduce(self, env: DistEnv) -> dict[str, float]:
        keys = sorted(self.sums)
        values = torch.stack([self.sums[key].to(self.device) for key in keys] + [torch.tensor(float(self.samples), device=self.device)])
        if env.distributed:
            reduce_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
            values = values.to(reduce_device)
            dist.all_reduce(values)
        values = values.cpu().tolist()
        samples = values[-1]
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        metrics = {key: value / samples for key, value in zip(keys, values[:-1])}
        metrics["grad_norm"] = float(self.grad_norm) / self.steps
        metrics["lr"] = self.lr
        metrics["samples_per_s"] = self.global_samples / elapsed
        return metrics


# ----------------------------------------------------------------------------------------------
# Helpers


def _clip(params: list[torch.Tensor], max_norm: float, device: torch.device) -> torch.Tensor:
    """Return the global gradient norm and scale gradients down to `max_norm` (0 = no clipping)."""
    grads = [param.grad for param in params if param.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    norm = torch.nn.utils.get_total_norm(grads)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def _as_tensor(value: Any, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().float()
    return torch.tensor(float(value), device=device)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: _to_device(value, device) for key, value in batch.items()}
    return batch
