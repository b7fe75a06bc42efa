"""The table of model families whose parts need saying (anything else is read off the
model's structure by ``detect.py``).

Each family says where its transformer blocks, embeddings, final norm and head live, as
attribute paths into the Hugging Face model. Several candidate paths are allowed per role
because transformers moves things between major versions (e.g. ViT's blocks moved from
``vit.encoder.layer`` to ``vit.layers``). Families are matched by ``config.model_type``.

A row overrides detection (e.g. LoRA targets narrower than every linear layer) and documents
the families the tests cover; :func:`register_family` adds one. Nothing else in the code base
branches on the model type.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import UserError


@dataclass(frozen=True)
class Family:
    """Where the parts of one model family live (candidate attribute paths per role)."""

    blocks: tuple[str, ...]
    embeddings: tuple[str, ...]
    final_norm: tuple[str, ...]
    head: tuple[str, ...]
    lora_targets: tuple[str, ...]
    lora_fan_in_fan_out: bool = False  # True where the targets are GPT-2 style Conv1D
    task: str = "causal-lm"  # or "image-classification"

    @classmethod
    def from_dict(cls, values: dict) -> "Family":
        """A family from JSON (a bundle's metadata, a run config's ``family:``, ``--family``)."""
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        except TypeError as exc:
            raise UserError(f"family: {exc}; give blocks, embeddings, final_norm, head, "
                            "lora_targets (lists of attribute paths / module names)") from None

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


_LLAMA_LIKE = Family(
    blocks=("model.layers",),
    embeddings=("model.embed_tokens",),
    final_norm=("model.norm",),
    head=("lm_head",),
    lora_targets=("q_proj", "v_proj"),
)

FAMILIES: dict[str, Family] = {
    "opt": Family(
        blocks=("model.decoder.layers",),
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions",
                    "model.decoder.project_in", "model.decoder.project_out"),
        final_norm=("model.decoder.final_layer_norm",),
        head=("lm_head",),
        lora_targets=("q_proj", "v_proj"),
    ),
    "gpt2": Family(
        blocks=("transformer.h",),
        embeddings=("transformer.wte", "transformer.wpe"),
        final_norm=("transformer.ln_f",),
        head=("lm_head",),
        lora_targets=("c_attn",),
        lora_fan_in_fan_out=True,
    ),
    "bloom": Family(
        blocks=("transformer.h",),
        embeddings=("transformer.word_embeddings", "transformer.word_embeddings_layernorm"),
        final_norm=("transformer.ln_f",),
        head=("lm_head",),
        lora_targets=("query_key_value",),
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gpt_neox": Family(
        blocks=("gpt_neox.layers",),
        embeddings=("gpt_neox.embed_in",),
        final_norm=("gpt_neox.final_layer_norm",),
        head=("lm_head", "embed_out"),
        lora_targets=("query_key_value",),
    ),
    "vit": Family(
        blocks=("vit.layers", "vit.encoder.layer"),
        embeddings=("vit.embeddings",),
        final_norm=("vit.layernorm",),
        head=("classifier",),
        lora_targets=("q_proj", "v_proj", "query", "value"),  # transformers 5 and 4 names
        task="image-classification",
    ),
}


def register_family(model_type: str, family: Family) -> None:
    """Teach fl-offsite a new architecture (``model_type`` as in the model's config)."""
    FAMILIES[model_type] = family


def _get(module: torch.nn.Module, path: str):
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


@dataclass(frozen=True)
class Arch:
    """A family resolved against one concrete model: the paths that exist in it."""

    model_type: str
    family: Family
    blocks_path: str
    embeddings: tuple[str, ...]
    final_norm: tuple[str, ...]
    head: tuple[str, ...]

    @property
    def task(self) -> str:
        return self.family.task

    def blocks(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return _get(model, self.blocks_path)


FAMILY_ATTRIBUTE = "offsite_family"  # a Family pinned on a model instance (see use_family)


def use_family(model: torch.nn.Module, family: Family | None) -> torch.nn.Module:
    """Pin ``family`` on ``model``: it then wins over the table and detection wherever the
    model goes (a bundle's own family, a user's override)."""
    if family is not None:
        setattr(model, FAMILY_ATTRIBUTE, family)
    return model


def resolve(model: torch.nn.Module) -> Arch:
    """Find the family of ``model`` (pinned, from the table, or read off the model) and the
    attribute paths of its parts."""
    from .detect import detect_family

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = getattr(model, FAMILY_ATTRIBUTE, None) or FAMILIES.get(model_type) or \
        detect_family(model)
    blocks = [p for p in family.blocks if isinstance(_get(model, p), torch.nn.ModuleList)]
    if not blocks:
        raise UserError(
            f"model: {model_type!r} model {type(model).__name__} has no transformer blocks at "
            f"{' or '.join(family.blocks)}; give the right paths with --family (or a run config's "
            "family: key)"
        )

    def present(paths: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(p for p in paths if _get(model, p) is not None)

    return Arch(model_type, family, blocks[0], present(family.embeddings),
                present(family.final_norm), present(family.head))
