"""``fl-offsite``: the command line. Each command parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import UserError


def _existing(path: str, flag: str) -> str:
    if not Path(path).exists():
        raise UserError(f"{flag}: {path} does not exist")
    return path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _train_config(args):
    from .training.loop import TrainConfig

    return TrainConfig(lr=args.lr, epochs=args.epochs, max_steps=args.max_steps,
                       batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed,
                       mixed_precision=args.mixed_precision)


def cmd_emulator(args) -> None:
    from .config import build_section
    from .offsite.owner import build_bundle

    distill = {"data": args.distill_data, "steps": args.distill_steps if args.distill_data else 0,
               "lr": args.distill_lr, "batch_size": args.distill_batch_size,
               "block_size": args.block_size, "max_examples": args.distill_max_examples,
               "kd_weight": args.kd_weight, "lm_weight": args.lm_weight,
               "layer_weight": args.layer_weight, "seed": args.seed}
    split = build_section("split", {
        "adapter_bottom": args.adapter_bottom, "adapter_top": args.adapter_top,
        "emulator_layers": args.emulator_layers, "drop_ratio": args.drop_ratio,
        "layer_selection": args.layer_selection, "repeat_blocks": args.repeat_blocks,
        "quantize": args.quantize, "distill": distill})
    info = build_bundle(args.model, args.out, split, args.dtype, args.overwrite,
                        log=lambda line: print(line, file=sys.stderr))
    plan = info.plan
    made = info.emulator
    how = made["layer_selection"] + (" + distilled" if "distill" in made else "") + \
        (f" + {made['quantize']}" if made.get("quantize") else "")
    print(f"bundle {args.out}: {plan.notation()} of {plan.depth} blocks ({how}); adapter "
          f"{list(plan.adapter)}, emulator {list(plan.emulator)}, dropped {list(plan.dropped)}; "
          f"hash {info.bundle_hash[:12]}")
    if "distill" in made:
        before, best = made["distill"]["held_out_before"], made["distill"]["held_out_best"]
        print(f"distilled: held-out nmse {before['nmse']:.4f} -> {best['nmse']:.4f} "
              f"(best step {made['distill']['best_step']})")


def cmd_train(args) -> None:
    from .training import data
    from .models.loading import load_model, load_processor
    from .training.loop import train

    cfg = _train_config(args)
    if args.tuning == "full":
        if not args.model:
            raise UserError("--tuning full: needs --model (full fine-tuning is the baseline "
                            "on the full model)")
        from .offsite.owner import save_model

        model = load_model(args.model, args.dtype)
        processor = load_processor(args.model)
        task = data.prepare(args.data, "train", processor, args.block_size, args.max_examples)
        model.requires_grad_(True)
        stats = train(model, task.train_items, cfg, getattr(processor, "pad_token_id", 0) or 0)
        save_model(model, processor, args.out, args.overwrite)
    else:
        if not args.bundle:
            raise UserError(f"--tuning {args.tuning}: needs --bundle BUNDLE_DIR (the data owner "
                            "trains on the emulator)")
        from .offsite.emulated import EmulatedModel

        emulated = EmulatedModel(_existing(args.bundle, "--bundle"))
        processor = load_processor(args.bundle)
        task = data.prepare(args.data, "train", processor, args.block_size, args.max_examples)
        lora = None
        if args.tuning == "lora":
            from .offsite.adapter import lora_config
            lora = lora_config(emulated.arch, args.lora_r, args.lora_alpha, args.lora_dropout)
        emulated.prepare(args.tuning, lora, args.seed)
        if args.out.exists() and not args.overwrite:
            raise UserError(f"--out: {args.out} exists; choose a new path or pass --overwrite")
        stats = train(emulated.model, task.train_items, cfg,
                      getattr(processor, "pad_token_id", 0) or 0)
        emulated.adapter().save(args.out)
    print(json.dumps({"out": str(args.out), **stats}))


def cmd_plug(args) -> None:
    from .offsite.emulated import load_adapter
    from .models.loading import load_processor
    from .offsite.owner import plugged_model, save_model

    adapter = load_adapter(_existing(args.adapter, "--adapter"))
    model = plugged_model(args.model, adapter, args.dtype)
    save_model(model, load_processor(args.model), args.out, args.overwrite)
    print(f"plugged {adapter.kind} adapter (blocks {list(adapter.indices)}) into {args.model} "
          f"-> {args.out}")


def cmd_evaluate(args) -> None:
    from .training import data
    from .training.evaluate import evaluate
    from .fileio import atomic_write_json
    from .models.loading import load_model, load_processor

    if bool(args.model) == bool(args.bundle):
        raise UserError("evaluate: give exactly one of --model or --bundle")
    adapter = None
    if args.adapter:
        from .offsite.emulated import load_adapter
        adapter = load_adapter(_existing(args.adapter, "--adapter"))
    if args.bundle:
        from .offsite.emulated import EmulatedModel

        emulated = EmulatedModel(_existing(args.bundle, "--bundle"))
        model, processor = emulated.model, load_processor(args.bundle)
        if adapter is not None:
            emulated.prepare(adapter.kind, adapter.lora or None)
            emulated.set_adapter(adapter)
    else:
        from .offsite.owner import plugged_model
        processor = load_processor(args.model)
        model = plugged_model(args.model, adapter, args.dtype) if adapter else \
            load_model(args.model, args.dtype)
    if args.lm_eval_tasks:
        try:
            from .training.lm_eval import run_tasks
        except ImportError:
            raise UserError("--lm-eval-tasks: lm-eval is not installed; pip install "
                            "'fl-offsite[lm-eval]'") from None
        record = {"model": args.model or args.bundle, "adapter": args.adapter,
                  "lm_eval": run_tasks(model, processor, args.lm_eval_tasks.split(","),
                                       args.max_examples)}
        atomic_write_json(args.out, record)
        print(json.dumps(record))
        return
    if not args.data:
        raise UserError("evaluate: give --data (or --lm-eval-tasks)")
    task = data.prepare(args.data, args.split, processor, args.block_size, args.max_examples)
    metrics = evaluate(model, task, processor)
    record = {"model": args.model or args.bundle, "adapter": args.adapter, "data": args.data,
              "split": args.split, "task": task.kind, "examples": len(task), **metrics}
    atomic_write_json(args.out, record)
    print(json.dumps(record))


def cmd_pretrain(args) -> None:
    from .reference.pretrain import PretrainConfig, pretrain

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    cfg = PretrainConfig(layers=args.layers, hidden=args.hidden, heads=args.heads, ffn=args.ffn,
                         vocab=args.vocab, context=args.context, batch=args.batch, lr=args.lr,
                         tokens=args.tokens, seed=args.seed)
    card = pretrain(_existing_dir(args.data, "--data"), args.out, cfg, args.resume,
                    command="fl-offsite " + " ".join(sys.argv[1:]), stop_at=args.stop_at)
    if card is None:
        print(f"stopped at step {args.stop_at}; continue with --resume")
        return
    print(f"{args.out}: {card['parameters']:,} parameters, {card['tokens_trained']:,} tokens, "
          f"validation perplexity {card['validation_perplexity']:.1f}")


def cmd_reproduce(args) -> None:
    import time as _time

    from .reference.reproduce import Plan, check_resumable, reproduce

    plan = Plan.quick() if args.quick else Plan()
    if args.model:
        plan.model = args.model
    if args.seeds:
        plan.seeds = args.seeds
    if args.resume:
        out = _existing_dir(args.resume, "--resume")
        check_resumable(plan, out)
    else:
        out = args.out or Path("runs") / f"reproduce-{_time.strftime('%Y%m%d-%H%M%S')}"
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--out: {out} already exists and is not empty; choose a new path "
                            "(or --resume it)")
    reproduce(plan, out)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'}, {out / 'results.md'}")


def _existing_dir(path: Path, flag: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{flag}: {path} is not a directory")
    return path


def _add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--tuning", choices=["blocks", "lora", "bitfit", "full"], default="blocks",
                   help="what to train: adapter blocks (default), LoRA or BitFit inside them, "
                        "or the whole model (baseline; needs --model)")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--max-steps", type=_positive_int, default=None,
                   help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=_positive_int, default=8)
    g.add_argument("--grad-accum", type=_positive_int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    g.add_argument("--lora-r", type=_positive_int, default=8)
    g.add_argument("--lora-alpha", type=_positive_int, default=16)
    g.add_argument("--lora-dropout", type=float, default=0.0)


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required,
                   help="local file or directory (train/validation/test .jsonl, .csv, .parquet, "
                        ".txt) or a hub dataset name[:config]")
    p.add_argument("--block-size", type=_positive_int, default=128,
                   help="tokens per language-modelling block / max sequence length")
    p.add_argument("--max-examples", type=_positive_int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-offsite", description="Federated Offsite-Tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    dtype = dict(choices=["float32", "float16", "bfloat16"], default="float32")

    p = sub.add_parser("emulator", help="model owner: split a model into adapter + emulator bundle")
    p.add_argument("--model", required=True, help="hub name, local path or fl-offsite/<zoo model>")
    p.add_argument("--out", required=True, type=Path, help="bundle directory to create")
    p.add_argument("--adapter-bottom", type=int, default=2, help="l: bottom blocks in the adapter")
    p.add_argument("--adapter-top", type=int, default=2, help="r: top blocks in the adapter")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--emulator-layers", type=int, help="k: middle blocks kept (uniform drop)")
    g.add_argument("--drop-ratio", type=float, help="fraction of middle blocks dropped")
    p.add_argument("--layer-selection", choices=["uniform", "similarity"], default="uniform",
                   help="which middle blocks to keep: evenly spaced, or the ones that change "
                        "the representation most on --distill-data")
    p.add_argument("--repeat-blocks", action="store_true",
                   help="similarity: repeat each kept block over the blocks it replaces")
    p.add_argument("--quantize", choices=["int8"], help="store the emulator as int8")
    p.add_argument("--dtype", **dtype)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("public data (distillation, similarity)")
    g.add_argument("--distill-data", help="public text: local path, fl-offsite/<name> or hub name")
    g.add_argument("--distill-steps", type=int, default=200,
                   help="distillation steps on --distill-data (0: use it only for selection)")
    g.add_argument("--distill-lr", type=float, default=1e-4)
    g.add_argument("--distill-batch-size", type=_positive_int, default=8)
    g.add_argument("--distill-max-examples", type=_positive_int)
    g.add_argument("--block-size", type=_positive_int, default=128)
    g.add_argument("--kd-weight", type=float, default=30.0,
                   help="weight of the normalised MSE at the middle's output")
    g.add_argument("--lm-weight", type=float, default=1.0, help="weight of the LM loss")
    g.add_argument("--layer-weight", type=float, default=0.0,
                   help="weight of matching every emulator position")
    p.set_defaults(func=cmd_emulator)

    p = sub.add_parser("train", help="data owner: fine-tune the adapter on the emulator")
    p.add_argument("--bundle", help="bundle directory from `fl-offsite emulator`")
    p.add_argument("--model", help="full model (only with --tuning full)")
    _add_data_args(p)
    p.add_argument("--out", required=True, type=Path,
                   help="adapter .safetensors file (model directory with --tuning full)")
    p.add_argument("--dtype", **dtype)
    p.add_argument("--overwrite", action="store_true")
    _add_training_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plug", help="model owner: plug an adapter into the full model")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True, help="adapter file or bundle directory")
    p.add_argument("--out", required=True, type=Path, help="model directory to write")
    p.add_argument("--dtype", **dtype)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_plug)

    p = sub.add_parser("evaluate", help="metrics of a full, emulated or plugged-in model")
    p.add_argument("--model", help="full model (with --adapter: plugged in)")
    p.add_argument("--bundle", help="emulated model (with --adapter: the adapter on the emulator)")
    p.add_argument("--adapter", help="adapter file or bundle directory")
    _add_data_args(p, required=False)
    p.add_argument("--lm-eval-tasks", help="comma-separated lm-eval task names (needs the "
                                          "lm-eval extra and hub access), instead of --data")
    p.add_argument("--split", default="test")
    p.add_argument("--out", type=Path, default=Path("metrics.json"), help="metrics JSON file")
    p.add_argument("--dtype", **dtype)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("pretrain", help="pretrain a small OPT + BPE tokenizer on a folder of "
                                        "text files (how the reference model was made)")
    p.add_argument("--data", type=Path, required=True, help="folder of .txt files")
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.add_argument("--resume", action="store_true", help="continue from OUT.work/checkpoint.pt")
    for flag, default in (("layers", 12), ("hidden", 128), ("heads", 4), ("ffn", 512),
                          ("vocab", 8192), ("context", 128), ("batch", 32),
                          ("tokens", 4_000_000), ("seed", 0), ("threads", 0)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--stop-at", type=int, help="checkpoint and stop after this step")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("reproduce", help="the paper's comparison on the packaged model and tasks")
    p.add_argument("--quick", action="store_true", help="small version (a few minutes)")
    p.add_argument("--model", help="model for the text tasks (default fl-offsite/ref-opt; "
                                   "fl-offsite/digits runs on fl-offsite/ref-vit)")
    p.add_argument("--seeds", type=int, nargs="+")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--out", type=Path, help="run directory (default runs/reproduce-<time>)")
    out.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="continue an interrupted reproduction (same --quick/--model/--seeds): "
                          "the tasks and seeds already done are not rerun")
    p.set_defaults(func=cmd_reproduce)

    from .federation.cli import add_commands
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if not getattr(args, "verbose", False):
        from .quiet import quiet_libraries
        quiet_libraries()
    try:
        args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
