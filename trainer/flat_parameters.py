"""A network's hundreds of parameter tensors as a few dozen flat ones, so that DeepSpeed ZeRO-2's per-parameter
work stops setting the step time.

ZeRO-2 does Python work for every parameter tensor on every step: a gradient hook that copies the gradient
into its bucket, an inf/nan check (eight kernels) for the fp16 loss scaler, a norm for clipping. SD 1.5's
UNet has 686 tensors; on an H100 that work kept the GPU idle for most of a step (bench/train_step_profile.py:
~120 ms of gradient hooks alone in a 337 ms step whose kernels took ~90 ms).

`flatten_parameters(module)` gives each *group* (a direct child of the module that it calls, a ModuleList
expanded into its members: the UNet's down/up blocks, its mid block, ...; a child larger than `SPLIT_ABOVE`
parameters split into its own children the same way) one flat nn.Parameter,
`flat_parameters`, holding all of the group's parameters; the original tensors are dropped. A forward
pre-hook on the group splits it into views and sets them where the parameters were, so the network computes
exactly as before, and autograd gathers the views' gradients into the flat gradient with one kernel per
group. Nothing else changes shape: `module.parameters()` yields the flat tensors (so DeepSpeed, casts and the
validation pipeline see those), and `unflatten_state_dict` turns a flat state dict back into the network's
own names for export.

Only for ZeRO-2: ZeRO-3 gathers a module's parameters when it runs, and a group's flat tensor would be
gathered whole, defeating parameter partitioning. A flattened module cannot be deep-copied (the views it
holds belong to the autograd graph; torch refuses, loudly): copy before flattening.
"""

from __future__ import annotations

import torch
from torch import nn

FLAT = "flat_parameters"


# The largest flat parameter bounds two transients of a step beyond ZeRO-2's own buffers: autograd's fp16
# gradient of a whole group, before ZeRO's hook copies it away, and the fp32 copy ZeRO-2's step makes of each
# optimizer group (flat parameters packed into groups of at most this size: trainer/deepspeed_setup.py). SD
# 1.5's largest block (up_blocks.1, 258M parameters) would need 1 GiB for that copy alone; split, the largest
# group is 62M (down_blocks.3), and the UNet and text encoder are 34 + 14 tensors instead of 686 + 196.
SPLIT_ABOVE = 64 * 2**20  # parameters


def flat_groups(module: nn.Module, split_above: int = SPLIT_ABOVE) -> list[str]:
    """The names of the submodules that get one flat parameter each: the module's children that hold
    parameters, containers (ModuleList/ModuleDict, which have no forward of their own) expanded, and so are
    children of more than `split_above` parameters that hold none themselves."""
    if any(True for _ in module.parameters(recurse=False)):
        raise ValueError(f"{type(module).__name__} holds parameters of its own; only its children's can be flattened")
    groups = []

    def visit(prefix: str, child: nn.Module) -> None:
        size = sum(p.numel() for p in child.parameters())
        if size == 0:
            return
        splittable = size > split_above and not any(True for _ in child.parameters(recurse=False))
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) or splittable:
            for name, grandchild in child.named_children():
                visit(f"{prefix}.{name}", grandchild)
        else:
            groups.append(prefix)

    for name, child in module.named_children():
        visit(name, child)
    return groups


def flatten_parameters(module: nn.Module, split_above: int = SPLIT_ABOVE) -> list[str]:
    """Replace the parameters of each group of `module` by one flat parameter (see the module docstring).
    Returns the group names. Every parameter must require grad and share one dtype and device."""
    groups = flat_groups(module, split_above)
    for group_name in groups:
        group = module.get_submodule(group_name)
        named = list(group.named_parameters(remove_duplicate=False))
        if len({id(p) for _, p in named}) != len(named):
            raise ValueError(f"{group_name} shares parameters between modules: cannot flatten it")
        if not all(p.requires_grad for _, p in named):
            raise ValueError(f"{group_name} has frozen parameters: flatten only what is trained")
        if len({(p.dtype, p.device) for _, p in named}) != 1:
            raise ValueError(f"{group_name} mixes dtypes or devices: cast it to one first")
        slots = []
        for name, parameter in named:
            owner_name, _, attribute = name.rpartition(".")
            slots.append((group.get_submodule(owner_name), attribute, parameter.shape, parameter.numel()))
        flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for _, p in named]))
        for owner, attribute, _, _ in slots:
            del owner._parameters[attribute]
        group.register_parameter(FLAT, flat)
        installer = _ViewInstaller(slots)
        group.register_forward_pre_hook(installer)
        installer(group, ())  # so that the module is whole before its first call too
    # A group can be a block that gradient checkpointing wraps (SD 1.5: 13 of the UNet's groups are resnets, and
    # every text encoder layer is one): its hook then writes into the module's __dict__ inside the checkpointed
    # call, a side effect torch.compile refuses there, breaking the graph at every such block (~two dozen graphs
    # instead of one). The views it installs are the same when the backward recomputes the block: not replayed then.
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    return groups


class _ViewInstaller:
    """Forward pre-hook: views of the group's current flat parameter where its parameters were. Made anew on
    every call, since casts and DeepSpeed replace the flat tensor's storage."""

    def __init__(self, slots: list[tuple[nn.Module, str, torch.Size, int]]):
        self.slots = slots
        self.sizes = [numel for *_, numel in slots]

    def __call__(self, group: nn.Module, args) -> None:
        pieces = getattr(group, FLAT).split(self.sizes)
        for (owner, attribute, shape, _), piece in zip(self.slots, pieces, strict=True):
            owner.__dict__[attribute] = piece.view(shape)


def unflatten_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (a state dict of `module` flattened) with every flat parameter split back into the parameters
    it holds, named as in `module`, an unflattened instance of the same architecture. Other entries pass as
    they are, so a state dict that was never flattened comes back unchanged."""
    result = dict(state)
    for key in [key for key in state if key.endswith(f".{FLAT}")]:
        group_name = key.removesuffix(f".{FLAT}")
        flat = result.pop(key)
        named = list(module.get_submodule(group_name).named_parameters())
        for (name, parameter), piece in zip(named, flat.split([p.numel() for _, p in named]), strict=True):
            result[f"{group_name}.{name}"] = piece.view(parameter.shape).clone()
    return result
