"""DeepSpeed ZeRO-1/2's optimizer step without the host syncs of its gradient clipping.

DeepSpeed 0.19.8 computes and clips the gradient norm with three host-device synchronizations per optimizer group:
the norm's inf/NaN mask fills with a device tensor built from a host value (a copy and a sync) through
`masked_fill_`, which reads that value back (another), and `unscale_and_clip_grads` asks `bool()` whether the norm
is invalid (a third). The trainer's SD 1.5 UNet has 17 groups: 51 of the 53 syncs of a step, in a step the host sets
the pace of (H100: the GPU busy ~35 % of it, bench/README.md), where each sync makes the host wait for the GPU's
queue to drain before it launches more. The replacements compute the same values on the device, bit for bit
(tests/test_deepspeed_setup.py). Two syncs a step are left: the overflow check over all gradients, and the step's
decision to skip an overflow.

Written against DeepSpeed 0.19.8's code: on any other version DeepSpeed is left as it is.
"""

from __future__ import annotations

import deepspeed
import torch
from deepspeed.runtime.zero import stage_1_and_2

FOR_VERSION = "0.19.8"
ORIGINAL_MASK = stage_1_and_2.mask_nan_or_inf_with_val_inplace
ORIGINAL_UNSCALE_AND_CLIP = stage_1_and_2.DeepSpeedZeroOptimizer.unscale_and_clip_grads


def install() -> bool:
    """Replace the two functions, process-wide (idempotent). False, and nothing replaced, on another version."""
    if deepspeed.__version__ != FOR_VERSION:
        return False
    stage_1_and_2.mask_nan_or_inf_with_val_inplace = _mask_nan_or_inf
    stage_1_and_2.DeepSpeedZeroOptimizer.unscale_and_clip_grads = _unscale_and_clip_grads
    return True


def _mask_nan_or_inf(input: torch.Tensor, device=None, val: float = -1.0) -> None:
    # A Python number as the fill value: nothing to copy to the device, nothing for masked_fill_ to read back. -1, as
    # DeepSpeed's fills whatever `val` says.
    input.masked_fill_(input.isnan().logical_or(input.isinf()), -1.0)


def _unscale_and_clip_grads(self, grad_groups_flat, total_norm) -> None:
    if self.clip_grad <= 0.0 or not torch.is_tensor(total_norm):
        return ORIGINAL_UNSCALE_AND_CLIP(self, grad_groups_flat, total_norm)
    # DeepSpeed's arithmetic, in its order. An invalid norm (inf, NaN, or the -1 the mask above put there) clips as
    # an infinite one, as DeepSpeed's does; chosen on the device instead of asked of it.
    clip_norm = torch.where(
        torch.isfinite(total_norm) & (total_norm >= 0), total_norm, torch.full_like(total_norm, float("inf"))
    )
    clip = torch.clamp(((clip_norm / self.loss_scale) + 1e-6) / self.clip_grad, min=1.0)
    combined_scale = clip * self.loss_scale
    for grad in grad_groups_flat:
        for g in grad if isinstance(grad, list) else [grad]:
            g.data.mul_(1.0 / combined_scale)
