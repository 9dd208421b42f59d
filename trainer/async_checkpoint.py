"""A DeepSpeed checkpoint engine that takes the disk write off the training path.

DeepSpeed's default engine `torch.save`s every shard synchronously: for SD 1.5 under ZeRO-2 that is 11 GiB
per save, and training stood still for 16-18 s on an H200 (../shared/notes/device.md). Here `save()` only
copies the state into host memory (into pinned buffers reused from one checkpoint to the next, so on a GPU
the copy runs at PCIe speed) and a background thread writes it. `wait()` returns once everything queued
is on storage; the checkpoint is reported to Ray Train only after that (see trainer.checkpoint).

The copy, not a reference, is what makes this safe: the optimizer updates its states in place on the
next step, while the write is still going on.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


class AsyncCheckpointEngine(TorchCheckpointEngine):
    def __init__(self):
        super().__init__(config_params=None)
        self.name = "AsyncCheckpointEngine"
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: list[Future] = []
        self._lock = threading.Lock()
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}

    def preserves_storage_sharing(self) -> bool:
        # DeepSpeed would otherwise clone the module state to CPU itself, synchronously; save() copies anyway.
        return False

    def save(self, state_dict: Any, path: str) -> None:
        self.wait()  # the host buffers of the previous checkpoint must be written before they are reused
        counter = iter(range(1 << 62))
        file_key = path.rsplit("/", 1)[-1]
        snapshot = _map_tensors(state_dict, lambda t: self._to_host(t, (file_key, next(counter))))
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        with self._lock:
            self._pending.append(self._writer.submit(torch.save, snapshot, path))

    def wait(self) -> None:
        """Block until every write queued so far is on storage; re-raise a failed write. Thread-safe: Ray's
        upload thread and the training thread both call it."""
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            future.result()
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()]

    def _to_host(self, tensor: torch.Tensor, key: tuple[str, int]) -> torch.Tensor:
        tensor = tensor.detach()
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=tensor.is_cuda)
            self._buffers[key] = buffer
        buffer.copy_(tensor, non_blocking=tensor.is_cuda)
        return buffer


def _map_tensors(item: Any, fn) -> Any:
    """`item` with every tensor in it (nested in dicts, lists, tuples) replaced by fn(tensor)."""
    if torch.is_tensor(item):
        return fn(item)
    if isinstance(item, dict):
        copy = item.copy()  # keeps the mapping's type (OrderedDict, defaultdict)
        for key, value in copy.items():
            copy[key] = _map_tensors(value, fn)
        return copy
    if isinstance(item, (list, tuple)):
        values = [_map_tensors(v, fn) for v in item]
        if all(new is old for new, old in zip(values, item, strict=True)):
            return item  # no tensors inside: keep it as it is (torch.Size, namedtuples, ...)
        if isinstance(item, list):
            return values
        return type(item)(*values) if hasattr(item, "_fields") else type(item)(values)
    return item
