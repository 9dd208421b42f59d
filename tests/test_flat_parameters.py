"""Flat parameters (trainer/flat_parameters.py): the networks compute, learn and export exactly as before."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dreambooth.sd_model import load_base_model
from trainer.flat_parameters import FLAT, flat_groups, flatten_parameters, unflatten_state_dict


@pytest.fixture(scope="module")
def networks(tiny_model):
    model = load_base_model(tiny_model, dtype=torch.float32, components=("unet", "text_encoder"))
    return model.unet, model.text_encoder


def unet_inputs(unet):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor([10, 700]), states


def test_unet_computes_and_learns_as_before(networks):
    reference = copy.deepcopy(networks[0])
    flat = copy.deepcopy(networks[0])
    groups = flatten_parameters(flat)

    assert groups == flat_groups(reference)
    assert "down_blocks.0" in groups and "down_blocks" not in groups  # a ModuleList has no forward: expanded
    assert [name for name, _ in flat.named_parameters()] == [f"{g}.{FLAT}" for g in groups]
    assert sum(p.numel() for p in flat.parameters()) == sum(p.numel() for p in reference.parameters())

    inputs = unet_inputs(reference)
    expected, got = reference(*inputs).sample, flat(*inputs).sample
    assert torch.equal(expected, got)
    expected.square().mean().backward()
    got.square().mean().backward()
    grads = unflatten_state_dict(reference, {name: p.grad for name, p in flat.named_parameters()})
    for name, parameter in reference.named_parameters():
        assert torch.equal(grads[name], parameter.grad), name


def test_gradient_checkpointing_learns_as_before(networks):
    """Recomputation in backward reads the views the forward installed: same gradients, one per flat tensor."""
    unet, text_encoder = networks
    for reference, run in (
        (unet, lambda m: m(*unet_inputs(m)).sample),
        (text_encoder, lambda m: m(torch.arange(77)[None] % 100)[0]),
    ):
        reference = copy.deepcopy(reference).train()
        flat = copy.deepcopy(reference)
        flatten_parameters(flat)
        for network in (reference, flat):
            if hasattr(network, "enable_gradient_checkpointing"):
                network.enable_gradient_checkpointing()
            else:
                network.gradient_checkpointing_enable()
            run(network).square().mean().backward()
        grads = unflatten_state_dict(reference, {name: p.grad for name, p in flat.named_parameters()})
        for name, parameter in reference.named_parameters():
            assert torch.allclose(grads[name], parameter.grad, rtol=1e-5, atol=1e-7), name


def test_text_encoder_computes_as_before(networks):
    reference = copy.deepcopy(networks[1])
    flat = copy.deepcopy(networks[1])
    groups = flatten_parameters(flat)
    ids = torch.randint(0, reference.config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(1))
    assert len(list(flat.parameters())) == len(groups) < len(list(reference.parameters()))
    assert torch.equal(reference(ids)[0], flat(ids)[0])


def test_state_dict_round_trip(networks):
    reference = networks[0]
    flat = copy.deepcopy(reference)
    flatten_parameters(flat)
    restored = unflatten_state_dict(reference, flat.state_dict())
    assert restored.keys() == reference.state_dict().keys()
    assert all(torch.equal(restored[k], v) for k, v in reference.state_dict().items())
    # A state dict that was never flattened passes unchanged.
    assert unflatten_state_dict(reference, reference.state_dict()).keys() == reference.state_dict().keys()


def test_views_follow_the_flat_tensor_when_its_storage_is_replaced(networks):
    """DeepSpeed and casts swap the flat tensor's storage; the next forward must compute with the new one."""
    flat = copy.deepcopy(networks[0])
    flatten_parameters(flat)
    inputs = unet_inputs(flat)
    before = flat(*inputs).sample
    for parameter in flat.parameters():
        parameter.data = parameter.data * 0.5
    assert not torch.allclose(flat(*inputs).sample, before)
    flat.to(torch.float64)
    assert flat(*(x.double() if x.is_floating_point() else x for x in inputs)).sample.dtype == torch.float64


def test_refuses_what_it_cannot_flatten():
    shared = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="shares parameters"):
        flatten_parameters(nn.Sequential(nn.Sequential(shared, shared)))
    frozen = nn.Sequential(nn.Linear(2, 2).requires_grad_(False))
    with pytest.raises(ValueError, match="frozen"):
        flatten_parameters(frozen)
    with pytest.raises(ValueError, match="mixes dtypes"):
        flatten_parameters(nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).half())))
    with pytest.raises(ValueError, match="of its own"):
        flatten_parameters(nn.Linear(2, 2))


def test_compiles_without_recompiling_as_the_storage_changes(networks):
    """torch_compile traces the views' hooks into the graph; the flat tensors' storage being swapped (ZeRO-2
    moves them into its own buffer, casts replace them) must not make it compile again."""
    import torch._dynamo

    flat = copy.deepcopy(networks[0])
    flatten_parameters(flat)
    eager = flat(*unet_inputs(flat)).sample
    flat.compile(backend="eager")  # dynamo's tracing and guards, without inductor's code generation
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for _ in range(3):
        for parameter in flat.parameters():
            parameter.data = parameter.data.clone()
        out = flat(*unet_inputs(flat)).sample
        out.square().mean().backward()
    assert torch.allclose(out, eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert all(p.grad is not None for p in flat.parameters())
