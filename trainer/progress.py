"""Rank 0's training progress: throttled events for followers, TensorBoard scalars, throughput and ETA."""

from __future__ import annotations

import logging
import queue
import resource
import threading
import time
from pathlib import Path

import torch

from trainer.events import EventLog
from trainer.metrics import TrainMetrics

log = logging.getLogger(__name__)


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` averaged over the ranks of the default process group (each rank's losses are of its own share of
    the batch; rank 0's alone would be a noisier loss than the one trained on). Queued on the device's stream: no
    host sync. Every rank must call it at the same step."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return values
    summed = values.clone()
    torch.distributed.all_reduce(summed)  # SUM, then divide: gloo (CPU) has no AVG
    return summed / torch.distributed.get_world_size()


class ProgressReporter:
    """Accumulates losses on the device (no host sync per step) and publishes them every `interval_s`."""

    def __init__(
        self,
        events: EventLog,
        tensorboard_dir: Path,
        total_steps: int,
        start_step: int,
        interval_s: float = 1.0,
        metrics: TrainMetrics | None = None,
    ):
        self.events = events
        self.tensorboard = TensorBoardScalars(tensorboard_dir, start_step)
        self.total_steps = total_steps
        self.interval_s = interval_s
        self.metrics = metrics
        self._window_start_step = start_step
        self._timed_from: tuple[float, int] | None = None  # (time, step) the rate is measured from
        self._sums: torch.Tensor | None = None
        self._count = 0

    def step(
        self,
        step: int,
        loss: torch.Tensor,
        instance_loss: torch.Tensor,
        prior_loss: torch.Tensor,
        lr: float,
        force: bool = False,
        skipped_steps: int = 0,
    ) -> None:
        """Record the losses of optimizer step `step` (1-based); publish if the interval has passed.
        `skipped_steps`: optimizer steps skipped so far on fp16 overflow (DeepSpeed's loss scaler)."""
        values = torch.stack([loss.detach(), instance_loss.detach(), prior_loss.detach()]).float()
        self._sums = values if self._sums is None else self._sums + values
        self._count += 1
        now = time.perf_counter()
        if self._timed_from is None:
            # The run's first step paid for more than a step (the model's load, a resume's validation, and with
            # torch_compile minutes of compiling): told at once, with no rate, and the rate (and the ETA) timed from
            # its end, the loop's.
            self._timed_from = (now, step)
        elif not force and now - self._timed_from[0] < self.interval_s:
            return
        loss_avg, instance_avg, prior_avg = (self._sums / self._count).tolist()
        timed_since, timed_from_step = self._timed_from
        steps_per_s = (step - timed_from_step) / max(now - timed_since, 1e-9) if step > timed_from_step else None
        eta_s = (self.total_steps - step) / steps_per_s if steps_per_s else None
        fields = {
            "step": step,
            "total_steps": self.total_steps,
            "loss": loss_avg,
            "instance_loss": instance_avg,
            "prior_loss": prior_avg,
            "lr": lr,
            "steps_per_s": steps_per_s,
            "eta_s": eta_s,
            "skipped_steps": skipped_steps,
        }
        fields.update(peak_memory())
        self.events.emit("progress", **fields)
        names = ("loss", "instance_loss", "prior_loss", "lr", "steps_per_s")
        self.tensorboard.add({f"train/{n}": fields[n] for n in names if fields[n] is not None}, step)
        if self.metrics is not None:
            self.metrics.record_steps(step - self._window_start_step)
        self._sums, self._count = None, 0
        self._window_start_step, self._timed_from = step, (now, step)

    def close(self) -> None:
        self.tensorboard.close()


class TensorBoardScalars:
    """Scalars for TensorBoard, written by a thread of their own: the training loop never waits on them.
    tensorboardX's writer thread dies on the first I/O error (a full disk, a stale NFS handle), and its bounded
    queue then blocks every later caller for good: a job hung in TRAINING, holding its GPUs, until max_job_run_s.
    Here scalars that find the queue full are dropped (the job's events file has them all), with one warning."""

    QUEUED = 1000  # reports (one a second): a stall of minutes

    def __init__(self, log_dir: Path, start_step: int, close_timeout_s: float = 10.0):
        self._queue: queue.Queue[tuple[dict[str, float], int] | None] = queue.Queue(self.QUEUED)
        self._close_timeout_s = close_timeout_s
        self._dropping = False
        self._thread = threading.Thread(target=self._write, args=(log_dir, start_step), name="tensorboard", daemon=True)
        self._thread.start()

    def add(self, scalars: dict[str, float], step: int) -> None:
        try:
            self._queue.put_nowait((scalars, step))
        except queue.Full:
            if not self._dropping:
                log.warning(
                    "TensorBoard's writer is stuck (can its folder be written?): scalars from step %d on are dropped",
                    step,
                )
                self._dropping = True

    def close(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            return  # stuck: nothing more will be written
        self._thread.join(self._close_timeout_s)

    def _write(self, log_dir: Path, start_step: int) -> None:
        try:
            from tensorboardX import SummaryWriter

            # A restarted run logs the steps after its checkpoint (or from the first, where it had none) again: the
            # marker at the first of them tells TensorBoard to drop what an earlier run logged from there on (else
            # every curve runs back and draws those steps twice). Files are named by the second they were opened
            # in; the suffix keeps a quick restart's from replacing them.
            writer = SummaryWriter(str(log_dir), purge_step=start_step + 1, filename_suffix=f".from-step-{start_step}")
        except Exception as e:
            log.warning("TensorBoard is off for this run: %s: %s", type(e).__name__, e)
            self._drain()
            return
        try:
            while (item := self._queue.get()) is not None:
                scalars, step = item
                for name, value in scalars.items():
                    writer.add_scalar(name, value, step)
        except Exception as e:
            log.warning("TensorBoard is off for the rest of this run: %s: %s", type(e).__name__, e)
            self._drain()
        try:
            writer.close()
        except Exception as e:
            log.warning("TensorBoard's last scalars may be lost: %s: %s", type(e).__name__, e)

    def _drain(self) -> None:
        """Takes and drops what is added, until close(): the training loop's reports never back up."""
        while self._queue.get() is not None:
            pass


def peak_memory() -> dict[str, float]:
    """The process's peak memory so far, as an event field: `peak_memory_gib` (CUDA's allocator) on a GPU,
    `peak_rss_gib` on a CPU."""
    if torch.cuda.is_available():
        return {"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
