"""The model owner's peak memory when building a bundle: read in parts vs the whole model.

    python benchmarks/owner_memory.py [--layers 22] [--hidden 2048] [--out FILE.json]

Writes a LLaMA-shaped checkpoint built from a config (default: TinyLlama-1.1B's shape) in
float16 safetensors shards of about 500 MB, tensor by tensor (the full model is never in this
process's memory), then, each in a fresh process, measures peak RSS of

- the Python runtime alone (fl-offsite's CLI imported: torch, transformers, flwr, ...),
- ``fl-offsite emulator`` (2-k-2 uniform, the bundle read from the shards: ``streaming.py``),
- the same bundle written from the whole model loaded with ``from_pretrained``,

for a float32 and a float16 bundle. Target: streaming peak <= 1.5 x bundle + runtime.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNTIME = "import fl_offsite.cli.offsite, fl_offsite.offsite.owner"  # what both variants import
LOADED = """
import sys
import fl_offsite.cli.offsite
from fl_offsite.models.loading import load_model
from fl_offsite.offsite.bundle import write_bundle
from fl_offsite.offsite.plan import make_plan
model = load_model(sys.argv[1], sys.argv[3])
depth = model.config.num_hidden_layers
write_bundle(model, make_plan(depth, 2, 2, int(sys.argv[4])), sys.argv[2], sys.argv[1], None)
"""
MEASURED = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def write_checkpoint(path: Path, layers: int, hidden: int, shard_bytes: int = 500 * 2**20
                     ) -> int:
    """A sharded float16 checkpoint; returns its parameter count."""
    import torch
    import transformers as T
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    config = T.LlamaConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers,
                           intermediate_size=int(hidden * 2.75), num_attention_heads=hidden // 64,
                           num_key_value_heads=max(1, hidden // 512), dtype="float16",
                           tie_word_embeddings=False)
    with init_empty_weights():
        skeleton = T.AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True)
    config.save_pretrained(path)
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, size, count = {}, {}, 0, 0

    def flush():
        nonlocal shard, size
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        shard, size = {}, 0

    for name, param in skeleton.state_dict().items():
        std = 1.0 if param.dim() == 1 else 0.02
        shard[name] = (torch.randn(param.shape, generator=generator) * std).half()
        size += shard[name].numel() * 2
        count += param.numel()
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": count * 2}, "weight_map": weight_map}))
    return count


def peak_rss(command: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of ``command`` in a fresh process."""
    start = time.time()
    done = subprocess.run([sys.executable, "-c", MEASURED, *command], capture_output=True,
                          text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command[:2])} failed:\n{done.stderr}")
    return int(done.stdout.strip().splitlines()[-1]), time.time() - start


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--emulator-layers", type=int, default=4)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    mb = 2**20
    rows = []
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        params = write_checkpoint(checkpoint, args.layers, args.hidden)
        runtime, _ = peak_rss([sys.executable, "-c", RUNTIME])
        for dtype in ("float32", "float16"):
            for how in ("read in parts", "whole model loaded"):
                out = Path(tmp) / f"bundle-{dtype}-{how.split()[0]}"
                if how == "read in parts":
                    command = ["fl-offsite", "emulator", "--model", str(checkpoint), "--out",
                               str(out), "--emulator-layers", str(args.emulator_layers),
                               "--dtype", dtype]
                else:
                    command = [sys.executable, "-c", LOADED, str(checkpoint), str(out), dtype,
                               str(args.emulator_layers)]
                peak, seconds = peak_rss(command)
                bundle = directory_bytes(out)
                rows.append({"bundle dtype": dtype, "owner": how,
                             "checkpoint MB": round(directory_bytes(checkpoint) / mb),
                             "full model MB (dtype)": round(params * (4 if dtype == "float32"
                                                                      else 2) / mb),
                             "bundle MB": round(bundle / mb), "runtime MB": round(runtime / mb),
                             "peak RSS MB": round(peak / mb),
                             "peak / (1.5 x bundle + runtime)": round(
                                 peak / (1.5 * bundle + runtime), 2),
                             "seconds": round(seconds, 1)})
                print(rows[-1], flush=True)
    columns = list(rows[0])
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"params": params, "layers": args.layers,
                                              "hidden": args.hidden, "rows": rows}, indent=2)
                                  + "\n")


if __name__ == "__main__":
    main()
