"""Flat parameters (trainer/flat_parameters.py): the networks compute, learn and export exactly as before."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dreambooth.sd_model import load_base_model
from trainer.flat_parameters import FLAT, SPLIT_ABOVE, flat_groups, flatten_parameters, unflatten_state_dict


@pytest.fixture(scope="module")
def networks(tiny_model):
    model = load_base_model(tiny_model, dtype=torch.float32, components=("unet", "text_encoder"))
    return model.unet, model.text_encoder


def unet_inputs(unet):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor([10, 700]), states


# The tiny model's blocks are far below SPLIT_ABOVE; 0 splits every block down to the modules holding parameters.
SPLITS = pytest.mark.parametrize("split_above", [SPLIT_ABOVE, 0], ids=["blocks", "split"])


@SPLITS
def test_unet_computes_and_learns_as_before(networks, split_above):
    reference = copy.deepcopy(networks[0])
    flat = copy.deepcopy(networks[0])
    groups = flatten_parameters(flat, split_above)

    assert groups == flat_groups(reference, split_above)
    if split_above:
        assert "down_blocks.0" in groups and "down_blocks" not in groups  # a ModuleList has no forward: expanded
    else:
        assert "down_blocks.0.resnets.0.conv1" in groups and "down_blocks.0" not in groups
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


@SPLITS
def test_gradient_checkpointing_learns_as_before(networks, split_above):
    """Recomputation in backward reads the views the forward installed (or, for groups inside a checkpointed
    block, installs them again): same gradients, one per flat tensor."""
    unet, text_encoder = networks
    for reference, run in (
        (unet, lambda m: m(*unet_inputs(m)).sample),
        (text_encoder, lambda m: m(torch.arange(77)[None] % 100)[0]),
    ):
        reference = copy.deepcopy(reference).train()
        flat = copy.deepcopy(reference)
        flatten_parameters(flat, split_above)
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


@SPLITS
def test_state_dict_round_trip(networks, split_above):
    reference = networks[0]
    flat = copy.deepcopy(reference)
    flatten_parameters(flat, split_above)
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


@SPLITS
def test_compiles_without_recompiling_as_the_storage_changes(networks, split_above):
    """torch_compile traces the views' hooks into the graph; the flat tensors' storage being swapped (ZeRO-2
    moves them into its own buffer, casts replace them) must not make it compile again."""
    import torch._dynamo

    flat = copy.deepcopy(networks[0])
    flatten_parameters(flat, split_above)
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


def test_compiles_as_one_graph_with_gradient_checkpointing(networks):
    """Groups that gradient checkpointing wraps (SD 1.5's resnets and text encoder layers; here, every module of the
    tiny UNet): their hooks' side effect inside the checkpointed call broke torch.compile's graph at each."""
    import torch._dynamo

    flat = copy.deepcopy(networks[0]).train()
    flatten_parameters(flat, 0)
    flat.enable_gradient_checkpointing()
    eager = flat(*unet_inputs(flat)).sample
    eager.square().mean().backward()
    expected = [p.grad.clone() for p in flat.parameters()]
    flat.zero_grad(set_to_none=True)
    flat.compile(backend="aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = flat(*unet_inputs(flat)).sample
    out.square().mean().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert torch.allclose(out, eager, atol=1e-6)
    for parameter, grad in zip(flat.parameters(), expected, strict=True):
        assert torch.allclose(parameter.grad, grad, rtol=1e-4, atol=1e-6)


def test_flat_parameters_are_packed_into_bounded_optimizer_groups():
    from trainer.deepspeed_setup import optimizer_groups

    network = nn.Sequential(*(nn.Sequential(nn.Linear(size, 1, bias=False)) for size in (6, 3, 2, 8, 1, 2)))
    flatten_parameters(network)
    network.extend([nn.Linear(2, 1, bias=False), nn.Linear(3, 1, bias=False)])  # not flat: a group of their own
    network.append(nn.Linear(4, 1).requires_grad_(False))  # frozen: in no group
    groups = optimizer_groups(network, max_group_size=5)
    sizes = [[p.numel() for p in group["params"]] for group in groups]
    assert sizes == [[6], [3, 2], [8], [1, 2], [2, 3]]


def test_zero2_steps_flat_parameters_in_groups_as_adamw_would(engine_spec, monkeypatch, tmp_path):
    """The trainer's DeepSpeed engine over flattened networks, its flat parameters in several optimizer groups
    (ZeRO-2 then copies one group's gradients to fp32 at a time): the weights move exactly as with torch's
    AdamW and gradient clipping over the original parameters, and the export's consolidation of its
    checkpoint gives them back."""
    import functools

    from trainer import deepspeed_setup
    from trainer.checkpoint import TAG
    from trainer.export import consolidated_state_dict

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Sequential(nn.Linear(16, 4)))
    flat = copy.deepcopy(reference)
    flatten_parameters(flat)  # 144 and 68 parameters
    grouping = functools.partial(deepspeed_setup.optimizer_groups, max_group_size=100)
    monkeypatch.setattr(deepspeed_setup, "optimizer_groups", grouping)
    spec = engine_spec(learning_rate=1e-3, max_grad_norm=0.05)  # clipping small enough to take part
    engine = deepspeed_setup.initialize(flat, spec, world_size=1)
    assert len(engine.optimizer.bit16_groups) == 2
    optimizer = torch.optim.AdamW(
        reference.parameters(), lr=spec.learning_rate, eps=1e-8, weight_decay=spec.adam_weight_decay
    )
    inputs = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(1))
    for x in inputs:
        engine.backward(engine(x).square().mean())
        engine.step()
        reference(x).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), spec.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    engine.save_checkpoint(str(tmp_path), tag=TAG)
    for state in (engine.module.state_dict(), consolidated_state_dict(tmp_path)):
        trained = unflatten_state_dict(reference, state)
        for name, parameter in reference.named_parameters():
            assert torch.allclose(trained[name], parameter.detach(), rtol=1e-5, atol=1e-6), name
