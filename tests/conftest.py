"""Tiny randomly initialised models of every supported family, built from configs (no hub)."""

from __future__ import annotations

import os

import pytest
import torch
import transformers as T

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

VOCAB = 97
SMALL = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=8, intermediate_size=32,
             num_attention_heads=2)
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=8, ffn_dim=32,
                               num_attention_heads=2, max_position_embeddings=64,
                               word_embed_proj_dim=16, pad_token_id=1, bos_token_id=2,
                               eos_token_id=2),
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=8, n_head=2, n_positions=64,
                                 bos_token_id=0, eos_token_id=0),
    "bloom": lambda: T.BloomConfig(vocab_size=VOCAB, hidden_size=16, n_layer=8, n_head=2),
    "llama": lambda: T.LlamaConfig(num_key_value_heads=1, **SMALL),
    "mistral": lambda: T.MistralConfig(num_key_value_heads=1, **SMALL),
    "qwen2": lambda: T.Qwen2Config(num_key_value_heads=1, **SMALL),
    "gpt_neox": lambda: T.GPTNeoXConfig(**SMALL),
    # no table entry: read off the model by fl_offsite.models.detect
    "qwen3": lambda: T.Qwen3Config(num_key_value_heads=1, head_dim=8, **SMALL, **TOKENS),
    "phi3": lambda: T.Phi3Config(num_key_value_heads=1, **SMALL, **TOKENS),  # fused qkv
    "gemma2": lambda: T.Gemma2Config(num_key_value_heads=1, head_dim=8, sliding_window=4,
                                     **SMALL, **TOKENS),  # soft-capping, sliding window
    "gemma3_text": lambda: T.Gemma3TextConfig(num_key_value_heads=1, head_dim=8,
                                              sliding_window=4, **SMALL, **TOKENS),
    "falcon": lambda: T.FalconConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=8,
                                     num_attention_heads=2, **TOKENS),
    "gptj": lambda: T.GPTJConfig(vocab_size=VOCAB, n_embd=16, n_layer=8, n_head=2, rotary_dim=4,
                                 n_positions=64, **TOKENS),
    "olmo2": lambda: T.Olmo2Config(num_key_value_heads=1, **SMALL, **TOKENS),
    "stablelm": lambda: T.StableLmConfig(num_key_value_heads=1, **SMALL, **TOKENS),  # partial rotary
    "mixtral": lambda: T.MixtralConfig(num_key_value_heads=1, num_local_experts=4,
                                       num_experts_per_tok=2, **SMALL, **TOKENS),  # MoE
    "vit": lambda: T.ViTConfig(hidden_size=16, num_hidden_layers=8, intermediate_size=32,
                               num_attention_heads=2, image_size=16, patch_size=4, num_labels=3),
}
FAMILIES = list(CONFIGS)


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    auto = T.AutoModelForImageClassification if family == "vit" else T.AutoModelForCausalLM
    model = auto.from_config(config).eval()
    model.config.use_cache = False
    with torch.no_grad():  # every tensor distinct (default init makes biases all zero)
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if param.dim() == 1 else 0.0))
    return model


def model_inputs(model, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if model.config.model_type == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    return {"input_ids": torch.randint(3, VOCAB, (2, 12), generator=g)}


def training_items(model, n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    if model.config.model_type == "vit":
        return [{"pixel_values": torch.randn(3, 16, 16, generator=g),
                 "labels": torch.tensor(i % 3)} for i in range(n)]
    return [{"input_ids": (ids := torch.randint(3, VOCAB, (12,), generator=g)), "labels": ids}
            for _ in range(n)]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_opt_path():
    from fl_offsite.models.loading import resolve_model_path
    return resolve_model_path("fl-offsite/tiny-opt")


@pytest.fixture(scope="session")
def pydoc_data():
    from pathlib import Path
    import fl_offsite
    return str(Path(fl_offsite.__file__).parent / "datasets" / "pydoc")


class RecordingGrid:
    """The real Grid, keeping every (messages sent, replies received) exchange of the model
    owner, in order: what crossed the wire, seen from outside the server's own counters."""

    def __init__(self, grid, calls: list):
        self.grid, self.calls = grid, calls

    def send_and_receive(self, messages, *args, **kwargs):
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, *args, **kwargs))
        self.calls.append((messages, replies))
        return replies

    def push_messages(self, messages):
        messages = list(messages)
        self.calls.append((messages, []))
        return self.grid.push_messages(messages)

    def __getattr__(self, attr):
        return getattr(self.grid, attr)


def record_wire(monkeypatch) -> list:
    """Make the next federations run on a ``RecordingGrid``; returns its list of exchanges."""
    from fl_offsite.federation import server

    calls: list = []
    real = server.run_federation
    monkeypatch.setattr(server, "run_federation",
                        lambda grid, *a, **k: real(RecordingGrid(grid, calls), *a, **k))
    return calls


@pytest.fixture
def wire(monkeypatch):
    return record_wire(monkeypatch)


def received_bytes(message) -> int:
    """What a receiver decodes from ``message``: its arrays' bytes and its byte strings."""
    from flwr.app import ArrayRecord, ConfigRecord

    total = 0
    for record in message.content.values():
        if isinstance(record, ArrayRecord):
            total += sum(array.numpy().nbytes for array in record.values())
        elif isinstance(record, ConfigRecord):
            for value in record.values():
                total += sum(len(v) for v in (value if isinstance(value, list) else [value])
                             if isinstance(v, bytes))
    return total
