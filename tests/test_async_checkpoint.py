"""AsyncCheckpointEngine: what is written is the state at save() time, whatever training does next."""

from __future__ import annotations

import collections
import threading

import pytest
import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

from trainer.async_checkpoint import AsyncCheckpointEngine


def begin(engine: AsyncCheckpointEngine, tag: str, directory) -> None:
    """What DeepSpeed's save_checkpoint calls before the files of a checkpoint."""
    engine.create(CheckpointCommitInfo(tag=tag, save_dir=str(directory), save_latest=False))


def test_written_state_is_the_snapshot_not_the_live_tensors(tmp_path):
    weights = torch.arange(1_000_000, dtype=torch.float32)
    state = {
        "module": collections.OrderedDict(w=weights),
        "optimizer": {"state": {0: {"exp_avg": weights * 2, "step": 3}}, "groups": [(weights[:3], "lr")]},
        "shapes": [torch.Size([1000, 1000])],  # ZeRO-3 keeps parameter shapes; zero_to_fp32 calls .numel() on them
    }
    engine = AsyncCheckpointEngine()
    begin(engine, "a", tmp_path)
    writing = threading.Event()
    engine._writer.submit(writing.wait)  # the write waits until the weights have changed: a reference would show it
    engine.save(state, str(tmp_path / "a.pt"))
    weights.add_(1)  # the next optimizer step, while the write is still to come
    writing.set()
    engine.wait()
    saved = torch.load(tmp_path / "a.pt", weights_only=False)
    assert torch.equal(saved["module"]["w"], torch.arange(1_000_000, dtype=torch.float32))
    assert isinstance(saved["module"], collections.OrderedDict)
    assert saved["optimizer"]["state"][0]["step"] == 3
    assert saved["optimizer"]["groups"][0][1] == "lr"
    assert isinstance(saved["shapes"][0], torch.Size)

    # The second checkpoint reuses the host buffers and holds the new values; the first file is untouched.
    buffers = engine.buffer_count()
    begin(engine, "b", tmp_path)
    engine.save(state, str(tmp_path / "b.pt"))
    assert engine.buffer_count() == buffers
    engine.wait()
    assert torch.equal(torch.load(tmp_path / "b.pt")["module"]["w"], weights)
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=False)["module"]["w"], weights - 1)


def test_the_fp16_loss_scaler_is_saved_as_it_was(tmp_path):
    """ZeRO's optimizer state holds the live loss scaler object: an overflow on the next step (while the write
    goes on) must not reach the checkpoint, or a resumed run would scale, and skip, differently."""
    scaler = DynamicLossScaler(
        init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=1, consecutive_hysteresis=False
    )
    engine = AsyncCheckpointEngine()
    begin(engine, "a", tmp_path)
    written = threading.Event()
    engine._writer.submit(written.wait)  # an earlier file of the checkpoint, still being written
    engine.save({"loss_scaler": scaler, "fp32": torch.ones(4)}, str(tmp_path / "a.pt"))
    scaler.cur_scale, scaler.last_overflow_iter = scaler.cur_scale / 2, scaler.cur_iter  # the next step overflows
    scaler.cur_iter += 1
    written.set()
    engine.wait()
    saved = torch.load(tmp_path / "a.pt", weights_only=False)["loss_scaler"]
    assert (saved.cur_scale, saved.cur_iter) == (2**16, 0) and scaler.cur_scale == 2**15


def test_a_failed_write_is_raised_by_wait(tmp_path):
    engine = AsyncCheckpointEngine()
    engine.save({"w": torch.ones(3)}, str(tmp_path / "missing-dir" / "a.pt"))
    with pytest.raises((FileNotFoundError, RuntimeError)):
        engine.wait()


def test_files_of_one_checkpoint_use_their_own_buffers(tmp_path):
    """Two files of one checkpoint (DeepSpeed writes model and optimizer states apart) hold their own values
    even when their tensors look alike: the second does not overwrite the first's buffers mid-write."""
    engine = AsyncCheckpointEngine()
    begin(engine, "a", tmp_path)
    engine.save({"w": torch.zeros(1000)}, str(tmp_path / "model.pt"))
    engine.save({"w": torch.ones(1000)}, str(tmp_path / "optim.pt"))
    engine.wait()
    assert torch.equal(torch.load(tmp_path / "model.pt")["w"], torch.zeros(1000))
    assert torch.equal(torch.load(tmp_path / "optim.pt")["w"], torch.ones(1000))
    assert engine.buffer_count() == 2


@pytest.mark.parametrize("saves_module", [True, False], ids=["rank 0", "other ranks"])
def test_host_buffers_are_reserved_once_the_optimizer_has_updated(tmp_path, engine_spec, saves_module):
    """A real DeepSpeed ZeRO-2 engine (CPU, gloo, one process): no reservation before the first update; after it,
    the background reservation holds every buffer the checkpoint then needs. A rank that does not write the
    module's state (every rank but the first, under ZeRO-2) reserves buffers for its optimizer state only."""
    from trainer.async_checkpoint import _map_tensors
    from trainer.deepspeed_setup import initialize

    spec = engine_spec()
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    engine = initialize(model, spec, world_size=1)
    engine.save_non_zero_checkpoint = saves_module  # as DeepSpeed sets it on rank 0 / the others
    writer = engine.checkpoint_engine = AsyncCheckpointEngine()

    writer.reserve_after_first_update(engine)  # before any update: the optimizer has no moments yet
    assert writer.buffer_count() == 0

    loss = engine(torch.randn(4, 32)).square().mean()
    engine.backward(loss)
    engine.step()
    writer.reserve_after_first_update(engine)
    writer.reserve_after_first_update(engine)  # once only
    reserved = writer.buffer_count()
    optimizer_tensors = []
    _map_tensors(engine.optimizer.state_dict(), optimizer_tensors.append)
    module_tensors = len(engine.module_state_dict()) if saves_module else 0
    assert reserved == len(optimizer_tensors) + module_tensors > 0
    engine.save_checkpoint(str(tmp_path), tag="a")
    writer.wait()
    assert writer.buffer_count() == reserved  # the checkpoint found every buffer it needed
    engine.save_checkpoint(str(tmp_path), tag="b")
    writer.wait()
    assert writer.buffer_count() == reserved  # and the next one reuses them
    if saves_module:
        _, client_state = engine.load_checkpoint(str(tmp_path), tag="b")
        assert client_state is not None
