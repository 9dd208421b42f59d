"""The trainer's DeepSpeed engine (trainer/deepspeed_setup.py), built in this process: what it starts from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer.flat_parameters import flatten_parameters


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_16_bit_training_starts_from_the_full_precision_weights(engine_spec, zero_stage):
    """DeepSpeed builds its fp32 master weights from the module it cast to bf16/fp16; the trainer writes the base
    model's fp32 weights into them, so the updates and the export start from the base model, not its rounding."""
    from deepspeed.utils import safe_get_full_fp32_param

    from trainer.deepspeed_setup import initialize

    torch.manual_seed(0)
    # Odd sizes: under ZeRO-3 on several ranks the last partition of each would be padded.
    network = nn.Sequential(nn.Sequential(nn.Linear(7, 13), nn.ReLU()), nn.Sequential(nn.Linear(13, 3)))
    if zero_stage == 2:
        flatten_parameters(network)  # as the trainer does under ZeRO-2
    originals = [p.detach().clone() for p in network.parameters()]
    assert not any(torch.equal(w, w.bfloat16().float()) for w in originals)  # bf16 would round every one

    engine = initialize(network, engine_spec(precision="bf16", zero_stage=zero_stage), world_size=1)
    try:
        for parameter, original in zip(engine.module.parameters(), originals, strict=True):
            assert parameter.dtype == torch.bfloat16  # what the forward uses
            assert torch.equal(safe_get_full_fp32_param(parameter).reshape(original.shape), original)
    finally:
        engine.destroy()


def test_clipping_without_host_syncs_updates_the_weights_as_deepspeed_does(engine_spec, monkeypatch):
    """trainer.deepspeed_syncs computes ZeRO-2's gradient norm and clipping on the device where DeepSpeed asks the
    host: the same weights, bit for bit, after steps that clip and after a step whose gradients are not finite."""
    from deepspeed.runtime.zero import stage_1_and_2

    from trainer import deepspeed_syncs
    from trainer.deepspeed_setup import initialize

    def untrained() -> nn.Module:
        torch.manual_seed(0)
        network = nn.Sequential(nn.Sequential(nn.Linear(7, 13), nn.ReLU()), nn.Sequential(nn.Linear(13, 3)))
        flatten_parameters(network)
        return network

    def train(install: bool) -> list[torch.Tensor]:
        network = untrained()
        with monkeypatch.context() as patch:
            if not install:  # DeepSpeed's own functions, for the reference
                patch.setattr(deepspeed_syncs, "install", lambda: False)
                patch.setattr(stage_1_and_2, "mask_nan_or_inf_with_val_inplace", deepspeed_syncs.ORIGINAL_MASK)
                patch.setattr(
                    stage_1_and_2.DeepSpeedZeroOptimizer,
                    "unscale_and_clip_grads",
                    deepspeed_syncs.ORIGINAL_UNSCALE_AND_CLIP,
                )
            # A small max_grad_norm: every step clips.
            engine = initialize(network, engine_spec(max_grad_norm=1e-3, learning_rate=1e-2), world_size=1)
            assert (stage_1_and_2.mask_nan_or_inf_with_val_inplace is deepspeed_syncs._mask_nan_or_inf) == install
            try:
                inputs = torch.randn(5, 4, 7, generator=torch.Generator().manual_seed(1))
                inputs[3, 0, 0] = float("inf")  # the fourth step's gradients are not finite
                for x in inputs:
                    engine.backward(engine(x).square().mean())
                    engine.step()
                return [p.detach().clone() for p in engine.module.parameters()]
            finally:
                engine.destroy()

    assert deepspeed_syncs.install(), "written for DeepSpeed 0.19.8: check the replacements against the new version"
    reference = train(install=False)
    weights = train(install=True)
    assert all(torch.equal(w, r) for w, r in zip(weights, reference, strict=True))
    assert not any(torch.equal(w, u) for w, u in zip(weights, untrained().parameters(), strict=True))  # it trained


def test_the_sync_free_functions_compute_what_deepspeeds_compute():
    """Function by function, over what a step can meet: norms finite, zero, infinite, NaN or the -1 DeepSpeed's mask
    puts there, in each norm dtype; max norms (0: no clipping), loss scales; gradients holding inf and NaN, as one
    tensor or a list of partitions. The same masked norm and the same gradients, bit for bit, as DeepSpeed's own."""
    from types import SimpleNamespace

    from trainer import deepspeed_syncs

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for value in (0.0, 1e-8, 3.0, 1e4, float("inf"), float("-inf"), float("nan"), -1.0):
            theirs, ours = torch.tensor(value, dtype=dtype), torch.tensor(value, dtype=dtype)
            deepspeed_syncs.ORIGINAL_MASK(theirs, device=theirs.device)
            deepspeed_syncs._mask_nan_or_inf(ours, device=ours.device)
            assert torch.equal(ours, theirs), (dtype, value)
            for clip_grad in (0.0, 1e-3, 1.0, 7.5):
                for loss_scale in (1.0, 65536.0, 0.125):
                    optimizer = SimpleNamespace(clip_grad=clip_grad, loss_scale=loss_scale, device=torch.device("cpu"))
                    grads = torch.randn(2, 6, generator=generator) * 1e3
                    grads[0, 0], grads[1, 1] = float("inf"), float("nan")
                    theirs = [grads[0].clone(), [grads[1].clone(), grads[1].clone()]]
                    ours = [grads[0].clone(), [grads[1].clone(), grads[1].clone()]]
                    norm = torch.tensor(value, dtype=dtype)
                    deepspeed_syncs.ORIGINAL_UNSCALE_AND_CLIP(optimizer, theirs, norm)
                    deepspeed_syncs._unscale_and_clip_grads(optimizer, ours, norm)
                    for a, b in zip([ours[0], *ours[1]], [theirs[0], *theirs[1]], strict=True):
                        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_a_build_lock_a_killed_process_left_does_not_hang_the_next_engine():
    """torch's lock on building a DeepSpeed op is a file its builder deletes when done: a worker killed mid-build (a
    cancelled job, Ctrl-C; a first build takes minutes) left it, and every later job's workers on the machine waited
    for it in deepspeed.initialize, forever. In a process of its own: this one has the op loaded already."""
    from torch.utils.cpp_extension import _get_build_directory

    left = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"
    left.parent.mkdir(parents=True, exist_ok=True)
    left.touch()
    load = (
        "from trainer.deepspeed_setup import load_ops; from trainer.spec import JobSpec; "
        "load_ops(JobSpec(base_model='m', instance_images=['i'], instance_prompt='sks', num_class_images=0, "
        "precision='fp32', gpus_per_worker=0))"
    )
    try:
        # Minutes where the op was never built here (it is built then); seconds otherwise.
        subprocess.run([sys.executable, "-c", load], check=True, timeout=600, cwd=Path(__file__).parents[1])
        assert not left.exists()
    finally:
        left.unlink(missing_ok=True)
