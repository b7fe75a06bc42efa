"""Named emulator recipes: a whole ``split:`` measured on one kind of model, sized to the depth
of the model it is applied to.

The split's own defaults (a 2+2 adapter, half the middle dropped, no distillation) are
Offsite-Tuning's on small models. On a real pretrained LLM they break it (SmolLM2-135M: the
emulator's perplexity in the tens of thousands, plug-in 3% better than zero-shot), so a user
with a new checkpoint should start from what was measured to work (README, "A real pretrained
LLM"). A recipe is a function from the model's block count to split settings; keys written
beside ``recipe`` (a run config's ``split:``, or the flags given to ``fl-offsite emulator``)
override the recipe's.
"""

from __future__ import annotations

from typing import Callable

from ..errors import UserError


def pretrained_llm(depth: int) -> dict:
    """SmolLM2-135M's measured recipe (30 blocks: 11-8-11): an adapter of 11/30 of the blocks
    at each end; every middle block kept with a fifth of its MLP channels, ranked by their
    activations on the packaged public text (the emulator is 40% of the middle's bytes; the
    adapter's gradients still pass every layer's attention), and not distilled: on that split
    distillation barely moved plug-in and took the emulator alone close to the full model.
    The distillation settings are the measured ones, for ``--distill-steps N
    --distill-after-compression`` on top."""
    side = max(1, round(depth * 11 / 30))
    if depth - 2 * side < 1:
        raise UserError(f"split.recipe pretrained-llm: a {depth}-block model leaves no middle "
                        "block; set split.adapter_bottom / adapter_top (--adapter-bottom, "
                        "--adapter-top) yourself")
    return {"adapter_bottom": side, "adapter_top": side, "drop_ratio": 0.0,
            "selection": {"name": "uniform"},
            "compression": {"name": "channels", "keep_ratio": 0.2},
            "distill": {"data": "fl-offsite/public-text", "steps": 0, "lr": 2e-4,
                        "batch_size": 4, "block_size": 128, "nmse": "per_token",
                        "kd_weight": 30.0, "lm_weight": 1.0, "eval_every": 50}}


RECIPES: dict[str, Callable[[int], dict]] = {
    "pretrained-llm": pretrained_llm,
}


def recipe_split(name: str, depth: int) -> dict:
    """The split settings of recipe ``name`` for a model of ``depth`` blocks."""
    if name not in RECIPES:
        raise UserError(f"split.recipe: unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name](depth)


def with_recipe(split: dict, model: str) -> dict:
    """``split`` (a run config's section, as written) with its ``recipe`` key replaced by that
    recipe's settings for ``model``; the keys written beside it win, section by section."""
    if "recipe" not in split:
        return split
    from ..models.loading import load_config

    written = {k: v for k, v in split.items() if k != "recipe"}
    base = recipe_split(split["recipe"], load_config(model).num_hidden_layers)
    if {"emulator_layers", "drop_ratio"} & written.keys():  # one way of sizing the emulator
        base.pop("drop_ratio", None)
    return _merged(base, written)


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        same_method = isinstance(value, dict) and isinstance(out.get(key), dict) and \
            value.get("name", out[key].get("name")) == out[key].get("name")
        out[key] = _merged(out[key], value) if same_method else value
    return out
