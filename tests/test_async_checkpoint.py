"""AsyncCheckpointEngine: what is written is the state at save() time, whatever training does next."""

from __future__ import annotations

import collections

import pytest
import torch

from trainer.async_checkpoint import AsyncCheckpointEngine


def test_written_state_is_the_snapshot_not_the_live_tensors(tmp_path):
    weights = torch.arange(1_000_000, dtype=torch.float32)
    state = {
        "module": collections.OrderedDict(w=weights),
        "optimizer": {"state": {0: {"exp_avg": weights * 2, "step": 3}}, "groups": [(weights[:3], "lr")]},
        "shapes": [torch.Size([1000, 1000])],  # ZeRO-3 keeps parameter shapes; zero_to_fp32 calls .numel() on them
    }
    engine = AsyncCheckpointEngine()
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
    engine.save(state, str(tmp_path / "b.pt"))
    engine.wait()
    assert torch.equal(torch.load(tmp_path / "b.pt")["module"]["w"], weights)
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=False)["module"]["w"], weights - 1)


def test_a_failed_write_is_raised_by_wait(tmp_path):
    engine = AsyncCheckpointEngine()
    engine.save({"w": torch.ones(3)}, str(tmp_path / "missing-dir" / "a.pt"))
    with pytest.raises((FileNotFoundError, RuntimeError)):
        engine.wait()
