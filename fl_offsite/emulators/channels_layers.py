"""MLP channel pruning of a block (``channels.py`` is its config): which layers make the MLP,
how much each hidden channel matters, and the block with only the kept channels.

An MLP is ``out(act(in_1(x)) [* in_2(x)])``: channel ``j`` is row ``j`` of every input
projection (``in`` features = hidden, ``out`` features = the MLP's width) and column ``j`` of
the output projection. Dropping it from all of them removes exactly its contribution, so the
pruned block is a smaller block of the same architecture: smaller ``nn.Linear`` (or GPT-2
``Conv1D``) layers, nothing new for the data owner to run.
"""

from __future__ import annotations

import torch

from ..training.data import collate
from .int8_layers import as_linear_weight
from .lowrank_layers import linear_layers

WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")


def mlp_width(config) -> int:
    """The MLP's hidden width (4 x hidden where the config leaves it implicit, as GPT-2's)."""
    for key in WIDTH_KEYS:
        if getattr(config, key, None):
            return int(getattr(config, key))
    return 4 * int(getattr(config, "hidden_size", None) or config.n_embd)


def mlp_layers(block: torch.nn.Module, width: int) -> tuple[list[str], list[str]]:
    """(input projections, output projections) of the block's MLP, by name; ([], []) when
    the block has no such pair (fused gate+up layers, MoE experts). Attention layers are
    never taken, even where a fused query-key-value layer happens to be as wide."""
    inputs, outputs = [], []
    for name, module in linear_layers(block):
        if "att" in name.lower():  # attn, self_attn, attention, self_attention
            continue
        out_features, in_features = as_linear_weight(module, module.weight).shape
        if out_features == width != in_features:
            inputs.append(name)
        elif in_features == width != out_features:
            outputs.append(name)
    return (inputs, outputs) if inputs and outputs else ([], [])


def weight_importance(block, state: dict[str, torch.Tensor], width: int) -> torch.Tensor:
    """Data-free channel importance: the norms of the channel's rows and columns, multiplied."""
    inputs, outputs = mlp_layers(block, width)
    score = torch.ones(width, dtype=torch.float64)
    for name in inputs:
        score *= as_linear_weight(block.get_submodule(name), state[f"{name}.weight"]).double().norm(dim=1)
    for name in outputs:
        score *= as_linear_weight(block.get_submodule(name), state[f"{name}.weight"]).double().norm(dim=0)
    return score


def activation_importance(student, blocks, positions: dict[int, int], width: int,
                          items: list[dict], pad_id: int, batches: int = 4,
                          batch_size: int = 8) -> dict[int, torch.Tensor]:
    """{block index: per-channel mean |activation| entering the output projection x that
    column's norm}, on public text run through the emulated model (Wanda-style)."""
    sums: dict[int, torch.Tensor] = {}
    hooks = []
    for index, position in positions.items():
        block = blocks[position]
        _, outputs = mlp_layers(block, width)

        def record(module, args, index=index):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().double().mean(0)
            sums[index] = sums.get(index, 0) + x

        hooks += [block.get_submodule(name).register_forward_pre_hook(record) for name in outputs]
    try:
        with torch.no_grad():
            for i in range(min(batches, max(1, len(items) // batch_size))):
                batch = collate(items[i * batch_size:(i + 1) * batch_size], pad_id)
                batch.pop("labels")
                student(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    out = {}
    for index, position in positions.items():
        block = blocks[position]
        state = {k: v.detach() for k, v in block.state_dict().items()}
        _, outputs = mlp_layers(block, width)
        columns = torch.ones(width, dtype=torch.float64)
        for name in outputs:
            columns *= as_linear_weight(block.get_submodule(name),
                                        state[f"{name}.weight"]).double().norm(dim=0)
        out[index] = sums[index] * columns
    return out


def kept_channels(importance: torch.Tensor, ratio: float) -> torch.Tensor:
    """The ``ratio`` most important channels (at least one), in their original order."""
    keep = max(1, round(ratio * len(importance)))
    return importance.argsort(descending=True)[:keep].sort().values


def pruned_block(block, state: dict[str, torch.Tensor], width: int, keep: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
    """``state`` with only the ``keep`` channels in the MLP's layers."""
    inputs, outputs = mlp_layers(block, width)
    state = dict(state)
    for name in inputs + outputs:
        module = block.get_submodule(name)
        weight = as_linear_weight(module, state[f"{name}.weight"])
        weight = weight[keep] if name in inputs else weight[:, keep]
        state[f"{name}.weight"] = as_linear_weight(module, weight).contiguous()  # stored layout
        if name in inputs and f"{name}.bias" in state:
            state[f"{name}.bias"] = state[f"{name}.bias"][keep].contiguous()
    return state


def zeroed_block(block, state: dict[str, torch.Tensor], width: int, keep: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
    """``state`` with the channels outside ``keep`` zeroed in the output projection: the
    pruned block's function at the full shapes (for measuring its effect in place)."""
    _, outputs = mlp_layers(block, width)
    mask = torch.zeros(width, dtype=torch.bool)
    mask[keep] = True
    state = dict(state)
    for name in outputs:
        module = block.get_submodule(name)
        weight = as_linear_weight(module, state[f"{name}.weight"]) * mask
        state[f"{name}.weight"] = as_linear_weight(module, weight).contiguous()
    return state


def use_pruned_layers(block: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give each linear layer whose weight in ``state`` is smaller than the block's a layer
    of that size (same class, no weights yet: the bundle's tensors are assigned next)."""
    for name, module in linear_layers(block):
        weight = state.get(f"{name}.weight")
        if weight is None or weight.shape == module.weight.shape:
            continue
        out_features, in_features = as_linear_weight(module, weight).shape
        with torch.device("meta"):
            if isinstance(module, torch.nn.Linear):
                replacement = torch.nn.Linear(in_features, out_features, module.bias is not None)
            else:  # GPT-2's Conv1D(nf=out, nx=in)
                replacement = type(module)(out_features, in_features)
        parent_name, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent_name) if parent_name else block, child, replacement)
