"""AsyncCheckpointEngine: what is written is the state at save() time, whatever training does next."""

from __future__ import annotations

import collections

import pytest
import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo

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
    engine.save(state, str(tmp_path / "a.pt"))
    weights.add_(1)  # the next optimizer step, while the write may still be going on
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


class SteppedEngine:
    """The part of a DeepSpeed engine that reserve_after_first_update reads."""

    def __init__(self, global_steps: int, skipped_steps: int):
        self.global_steps, self.skipped_steps = global_steps, skipped_steps
        self.weights = torch.zeros(10, 10)
        self.moments = {"exp_avg": torch.zeros(100), "exp_avg_sq": torch.zeros(100), "step": torch.tensor(1.0)}

    def module_state_dict(self):
        return {"w": self.weights}

    @property
    def optimizer(self):
        return self

    def state_dict(self):
        return {"base_optimizer_state": {"state": {0: self.moments}}, "loss_scale": 1.0}


def test_host_buffers_are_reserved_once_the_optimizer_has_updated(tmp_path):
    engine = AsyncCheckpointEngine()
    engine.reserve_after_first_update(SteppedEngine(global_steps=2, skipped_steps=2))  # fp16 overflow: no update
    assert engine.buffer_count() == 0

    stepped = SteppedEngine(global_steps=3, skipped_steps=2)
    engine.reserve_after_first_update(stepped)
    engine.reserve_after_first_update(stepped)  # once only
    begin(engine, "a", tmp_path)  # waits for the background allocation
    assert engine.buffer_count() == 4
    engine.save({"module": stepped.module_state_dict()}, str(tmp_path / "model.pt"))
    engine.save({"optimizer": stepped.state_dict()}, str(tmp_path / "optim.pt"))
    assert engine.buffer_count() == 4  # the checkpoint found every buffer it needed
