"""The trainable part of DreamBooth as one nn.Module, so a single DeepSpeed engine owns all of it.

The UNet is always trained; the text encoder optionally. Putting both in one module (rather than two
engines, or a text encoder stepped outside DeepSpeed as other trainers do) gives them one optimizer, one
ZeRO partitioning, one loss scaler and one checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn


class DreamBoothModel(nn.Module):
    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None = None):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.text_encoder is not None:
            encoder_hidden_states = self.text_encoder(input_ids)[0]
        return self.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]


def prior_preservation_loss(
    pred: torch.Tensor, target: torch.Tensor, num_instance: int, prior_loss_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DreamBooth's loss (paper, eq. 2): the batch is [instance samples; class samples]; the class half is
    the prior-preservation term. Returns (total, instance_loss, prior_loss), computed in fp32."""
    pred, target = pred.float(), target.float()
    instance_loss = nn.functional.mse_loss(pred[:num_instance], target[:num_instance])
    if pred.shape[0] == num_instance:
        return instance_loss, instance_loss, torch.zeros_like(instance_loss)
    prior_loss = nn.functional.mse_loss(pred[num_instance:], target[num_instance:])
    return instance_loss + prior_loss_weight * prior_loss, instance_loss, prior_loss
