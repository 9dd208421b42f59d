"""The trainer's DeepSpeed engine (trainer/deepspeed_setup.py), built in this process: what it starts from."""

from __future__ import annotations

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
