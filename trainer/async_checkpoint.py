"""A DeepSpeed checkpoint engine that takes the disk write off the training path.

DeepSpeed's default engine `torch.save`s every shard synchronously: for SD 1.5 under ZeRO-2 that is 11 GiB
per save, and training stood still for 16-18 s on an H200 (../shared/notes/device.md). Here `save()` only
copies the state into host memory and a background thread writes it. `wait()` returns once everything
queued is on storage (fsynced: it survives a power loss); the checkpoint is reported to Ray Train only after
that (see trainer.checkpoint).

The copy, not a reference, is what makes this safe: the optimizer updates its states in place on the
next step, while the write is still going on. The host buffers are pinned on GPUs (so the copy runs at
PCIe speed) and reused from one checkpoint to the next; `reserve_after_first_update()` allocates them in
the background early in training, because pinning 11 GiB takes seconds that the first checkpoint would
otherwise stall for. A checkpoint starts with DeepSpeed's `create()`, which waits for the previous one's
writes: only then may its buffers be overwritten. The files of one checkpoint use distinct buffers and do
not wait for each other.
"""

from __future__ import annotations

import collections
import copy
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from dreambooth.durable import sync_file

# A host buffer fits a tensor of this dtype and shape, pinned or not.
BufferKey = tuple[torch.dtype, torch.Size, bool]


class AsyncCheckpointEngine(TorchCheckpointEngine):
    def __init__(self):
        super().__init__(config_params=None)
        self.name = "AsyncCheckpointEngine"
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: list[Future] = []
        self._lock = threading.Lock()
        self._buffers: dict[BufferKey, list[torch.Tensor]] = collections.defaultdict(list)
        self._in_use: collections.Counter[BufferKey] = collections.Counter()  # by the checkpoint being saved
        self._reserving: threading.Thread | None = None
        self._reserved = False

    def preserves_storage_sharing(self) -> bool:
        # Read by DeepSpeed's MoE saves only (0.19: they would clone the module state to CPU, synchronously); our
        # dense saves never clone either way, and save() copies to its host buffers anyway.
        return False

    def reserve_after_first_update(self, engine) -> None:
        """Call after every optimizer step. Once the optimizer has updated the weights (its moments exist
        from then on; fp16 overflow skips the first updates), allocate host buffers for a checkpoint of
        `engine` in a background thread, once. The first checkpoint waits for it if it is not done by then."""
        if self._reserved or engine.global_steps <= engine.skipped_steps:
            return
        self._reserved = True
        wanted = collections.Counter(_key(t) for t in _checkpointed_tensors(engine))

        def allocate() -> None:
            for (dtype, shape, pinned), count in wanted.items():
                buffers = self._buffers[(dtype, shape, pinned)]
                while len(buffers) < count:
                    buffers.append(_new_buffer((dtype, shape, pinned)))

        self._reserving = threading.Thread(target=allocate, name="checkpoint-buffers", daemon=True)
        self._reserving.start()

    def create(self, info) -> None:
        super().create(info)
        self._join_reservation()
        self.wait()  # the previous checkpoint's buffers must be on storage before they are overwritten
        self._in_use.clear()

    def save(self, state_dict: Any, path: str) -> None:
        self._join_reservation()
        snapshot = _map_tensors(state_dict, self._to_host)
        # The rest is copied too, here: ZeRO's state holds live objects (the fp16 loss scaler), which the next
        # steps change while the write goes on. The tensors (host buffers by now) are kept as they are.
        tensors: dict[int, torch.Tensor] = {}
        _map_tensors(snapshot, lambda tensor: tensors.setdefault(id(tensor), tensor))
        snapshot = copy.deepcopy(snapshot, memo=tensors)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        with self._lock:
            self._pending.append(self._writer.submit(_save_durably, snapshot, path))

    def wait(self) -> None:
        """Block until every write queued so far is on storage; re-raise a failed write. Thread-safe: Ray's
        upload thread and the training thread both call it."""
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            future.result()
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()]

    def buffer_count(self) -> int:
        """Host buffers held, once a reservation under way has finished."""
        self._join_reservation()
        return sum(len(buffers) for buffers in self._buffers.values())

    def _join_reservation(self) -> None:
        if self._reserving is not None:
            self._reserving.join()
            self._reserving = None

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        key = _key(tensor)
        buffers, index = self._buffers[key], self._in_use[key]
        if index == len(buffers):
            buffers.append(_new_buffer(key))
        self._in_use[key] += 1
        buffer = buffers[index]
        buffer.copy_(tensor, non_blocking=tensor.is_cuda)
        return buffer


def _save_durably(snapshot: Any, path: str) -> None:
    # On disk, not only in the page cache, before Ray may commit the checkpoint and delete the one before it.
    torch.save(snapshot, path)
    sync_file(Path(path))


def _key(tensor: torch.Tensor) -> BufferKey:
    return tensor.dtype, tensor.shape, tensor.is_cuda


def _checkpointed_tensors(engine) -> list[torch.Tensor]:
    """The tensors this rank's part of a DeepSpeed checkpoint of `engine` holds: its ZeRO optimizer's state, and
    the module's on the rank that saves it."""
    tensors: list[torch.Tensor] = []

    def collect(tensor: torch.Tensor) -> torch.Tensor:
        tensors.append(tensor)
        return tensor

    # The module's state goes into the checkpoint of one rank (DeepSpeed's save_non_zero_checkpoint: rank 0 under
    # ZeRO-2): the others would pin host memory for a copy of the whole model (1.8 GiB for SD 1.5) never written.
    states = [engine.module_state_dict()] if engine.save_non_zero_checkpoint else []
    for state in [*states, engine.optimizer.state_dict()]:
        _map_tensors(state, collect)
    return tensors


def _new_buffer(key: BufferKey) -> torch.Tensor:
    dtype, shape, pinned = key
    return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=pinned)


def _map_tensors(item: Any, fn) -> Any:
    """`item` with every tensor in it (nested in dicts, lists, tuples) replaced by fn(tensor)."""
    if torch.is_tensor(item):
        return fn(item)
    if isinstance(item, dict):
        mapped = item.copy()  # keeps the mapping's type (OrderedDict, defaultdict)
        for key, value in mapped.items():
            mapped[key] = _map_tensors(value, fn)
        return mapped
    if isinstance(item, (list, tuple)):
        values = [_map_tensors(v, fn) for v in item]
        if all(new is old for new, old in zip(values, item, strict=True)):
            return item  # no tensors inside: keep it as it is (torch.Size, namedtuples, ...)
        if isinstance(item, list):
            return values
        return type(item)(*values) if hasattr(item, "_fields") else type(item)(values)
    return item
