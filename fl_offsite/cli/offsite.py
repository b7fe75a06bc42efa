"""``fl-offsite emulator | train | plug | evaluate``: the offsite-tuning round trip by hand."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..emulators import COMPRESSIONS, SELECTIONS
from ..emulators.channels import ChannelPruning
from ..emulators.harmonizer import BottleneckHarmonizer
from ..emulators.lowrank import LowRankCompression
from ..emulators.pipeline import DistillConfig, SplitConfig
from ..emulators.recipes import RECIPES, with_recipe
from ..emulators.similarity import SimilaritySelection
from ..errors import UserError
from ..config.sections import DataConfig, TuningConfig
from ..training.config import TrainConfig
from .flags import add_fields, field_values, flag_name

PLAN_FIELDS = ("adapter_bottom", "adapter_top")
SIZE_FIELDS = ("emulator_layers", "drop_ratio")
DISTILL_PREFIXED = ("data", "steps", "lr", "batch_size", "max_examples", "eval_every",
                    "nmse", "mixed_precision", "after_compression")
DISTILL_PLAIN = ("block_size", "kd_weight", "lm_weight", "layer_weight", "margin",
                 "margin_weight", "grad_weight")
LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout")
# the flags of each in-layer compression method (the fields they set), and their defaults
COMPRESSION_FLAGS = {"lowrank": ("rank_ratio", "allocation", "block_ratios"),
                     "channels": ("keep_ratio", "importance", "allocation", "block_ratios")}
FLAG_DEFAULTS = {"rank_ratio": LowRankCompression.model_fields["rank_ratio"].default,
                 **{f: ChannelPruning.model_fields[f].default
                    for f in ("keep_ratio", "importance", "allocation", "block_ratios")}}


def existing(path, flag: str):
    if not Path(path).exists():
        raise UserError(f"{flag}: {path} does not exist")
    return path


def block_ratios(text: str) -> dict[int, float]:
    """``--block-ratios 10=0.5,11=0.3``: a ratio per block index."""
    try:
        return {int(k): float(v) for k, v in (pair.split("=") for pair in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give block=ratio pairs, e.g. "
                                         "10=0.5,11=0.3") from None


def family(args) -> dict | None:
    """``--family``: a Family as JSON, inline or in a file."""
    if not getattr(args, "family", None):
        return None
    text = Path(args.family).read_text() if Path(args.family).is_file() else args.family
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--family: not JSON ({exc.msg}); give e.g. '{{\"blocks\": "
                        f"[\"model.layers\"], ...}}' or a .json file") from None
    if not isinstance(value, dict):
        raise UserError("--family: give a JSON object (blocks, embeddings, final_norm, head, "
                        "lora_targets)")
    return value


def split_config(args) -> SplitConfig:
    """The ``split`` section the emulator flags describe (validated like a run config's); with
    ``--recipe``, that recipe for ``--model`` with the flags given on top."""
    from ..config import build_section

    if args.repeat_blocks and args.layer_selection != "similarity":
        raise UserError("--repeat-blocks: needs --layer-selection similarity")
    tree = _flag_tree(args)
    if args.recipe:
        tree = with_recipe({"recipe": args.recipe, **_given_only(tree, args.given)},
                           args.model)
    return build_section("split", tree)


def _flag_tree(args) -> dict:
    selection = {"name": args.layer_selection}
    if args.layer_selection == "similarity":
        selection["repeat_blocks"] = args.repeat_blocks
    distill = {**field_values(args, DISTILL_PREFIXED, "distill-"),
               **field_values(args, DISTILL_PLAIN), "seed": args.seed}
    compression = {"name": args.compression} if args.compression else None
    own = COMPRESSION_FLAGS.get(args.compression, ())
    for flag, default in FLAG_DEFAULTS.items():
        if flag in own:
            compression[flag] = getattr(args, flag)
        elif args.recipe and flag_name(flag) in args.given:  # refines the recipe's compression
            compression = {**(compression or {}), flag: getattr(args, flag)}
        elif getattr(args, flag) != default:
            needs = " or ".join(f"--compression {m}" for m, f in COMPRESSION_FLAGS.items()
                                if flag in f)
            raise UserError(f"{flag_name(flag)}: needs {needs}")
    harmonizer = {"width": args.harmonizer_width} if args.harmonizer_width else None
    return {**field_values(args, PLAN_FIELDS + SIZE_FIELDS), "selection": selection,
            "distill": distill, "compression": compression, "harmonizer": harmonizer}


# the flags that set each part of the split section (besides --<field> for its own fields)
SECTION_FLAGS = {"selection": {"--layer-selection", "--repeat-blocks"},
                 "harmonizer": {"--harmonizer-width"}}


def _given_only(tree: dict, given: set[str]) -> dict:
    """The part of the flags' split section that the command line set (the rest is left to
    the recipe)."""
    out = {k: tree[k] for k in PLAN_FIELDS + SIZE_FIELDS if flag_name(k) in given}
    out.update({k: tree[k] for k, flags in SECTION_FLAGS.items() if flags & given})
    if tree["compression"] is not None:
        out["compression"] = tree["compression"]
    distill = {k: v for k, v in tree["distill"].items()
               if (flag_name(k, "distill-") if k in DISTILL_PREFIXED else flag_name(k)) in given}
    if distill:
        out["distill"] = distill
    return out


def train_config(args) -> TrainConfig:
    from ..config import build_section

    return build_section("train", field_values(args, TrainConfig.model_fields))


def cmd_emulator(args) -> None:
    from ..offsite.owner import build_bundle

    from ..models.offload import parse_max_memory

    max_memory = parse_max_memory(args.max_memory) if args.max_memory else None
    info = build_bundle(args.model, args.out, split_config(args), args.dtype, args.overwrite,
                        log=progress, family=family(args), max_memory=max_memory)
    plan = info.plan
    made = info.emulator
    how = made["layer_selection"] + (" + harmonizers" if "harmonizer" in made else "") + \
        (" + distilled" if "distill" in made else "") + \
        (f" + {made['quantize']}" if made.get("quantize") else "")
    print(f"bundle {args.out}: {plan.notation()} of {plan.depth} blocks ({how}); adapter "
          f"{list(plan.adapter)}, emulator {list(plan.emulator)}, dropped {list(plan.dropped)}; "
          f"hash {info.bundle_hash[:12]}")
    print(f"emulator: {made['emulator_bytes'] / 1e6:.1f} MB, {made['share_of_middle']:.1%} of "
          f"the {made['middle_bytes'] / 1e6:.1f} MB of middle blocks it stands in for")
    if "distill" in made:
        before, best = made["distill"]["held_out_before"], made["distill"]["held_out_best"]
        gradient = (f", gradient nmse {before['grad_nmse']:.4f} -> {best['grad_nmse']:.4f}"
                    if "grad_nmse" in best else "")
        print(f"distilled: held-out nmse {before['nmse']:.4f} -> {best['nmse']:.4f}{gradient} "
              f"(best step {made['distill']['best_step']})")


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cmd_train(args) -> None:
    from ..fileio import refuse_occupied
    from ..training import data
    from ..models.loading import load_model, load_processor
    from ..training.loop import train

    cfg = train_config(args)
    if args.tuning == "full":
        if not args.model:
            raise UserError("--tuning full: needs --model (full fine-tuning is the baseline "
                            "on the full model)")
        from ..offsite.owner import save_model

        refuse_occupied(args.out, args.overwrite)
        model = load_model(args.model, args.dtype, family(args))
        processor = load_processor(args.model)
        task = data.prepare(args.data, "train", processor, args.block_size, args.max_examples)
        model.requires_grad_(True)
        stats = train(model, task.train_items, cfg, getattr(processor, "pad_token_id", 0) or 0,
                      seed=args.seed, log=progress)
        save_model(model, processor, args.out, args.overwrite)
    else:
        if not args.bundle:
            raise UserError(f"--tuning {args.tuning}: needs --bundle BUNDLE_DIR (the data owner "
                            "trains on the emulator)")
        from ..offsite.emulated import EmulatedModel

        emulated = EmulatedModel(existing(args.bundle, "--bundle"))
        processor = load_processor(args.bundle)
        task = data.prepare(args.data, "train", processor, args.block_size, args.max_examples)
        lora = None
        if args.tuning == "lora":
            from ..offsite.adapter import lora_config
            lora = lora_config(emulated.arch, args.lora_r, args.lora_alpha, args.lora_dropout)
        emulated.prepare(args.tuning, lora, args.seed)
        refuse_occupied(args.out, args.overwrite)
        stats = train(emulated.model, task.train_items, cfg,
                      getattr(processor, "pad_token_id", 0) or 0, seed=args.seed,
                      log=progress)
        emulated.adapter().save(args.out)
    print(json.dumps({"out": str(args.out), **stats}))


def cmd_plug(args) -> None:
    from ..fileio import refuse_occupied
    from ..offsite.emulated import load_adapter
    from ..models.loading import DTYPES, checkpoint_dtype, load_processor
    from ..offsite.owner import plugged_model, save_model

    adapter = load_adapter(existing(args.adapter, "--adapter"))
    refuse_occupied(args.out, args.overwrite)
    model = plugged_model(args.model, adapter, family=family(args))
    model.to(DTYPES[args.dtype or checkpoint_dtype(args.model)])  # a float16 model stays so
    save_model(model, load_processor(args.model), args.out, args.overwrite)
    print(f"plugged {adapter.kind} adapter (blocks {list(adapter.indices)}) into {args.model} "
          f"-> {args.out}")


def cmd_evaluate(args) -> None:
    from ..training import data
    from ..training.evaluate import evaluate
    from ..fileio import atomic_write_json
    from ..models.loading import load_model, load_processor

    if bool(args.model) == bool(args.bundle):
        raise UserError("evaluate: give exactly one of --model or --bundle")
    adapter = None
    if args.adapter:
        from ..offsite.emulated import load_adapter
        adapter = load_adapter(existing(args.adapter, "--adapter"))
    if args.bundle:
        from ..offsite.emulated import EmulatedModel

        emulated = EmulatedModel(existing(args.bundle, "--bundle"))
        model, processor = emulated.model, load_processor(args.bundle)
        if adapter is not None:
            emulated.prepare(adapter.kind, adapter.lora or None)
            emulated.set_adapter(adapter)
    else:
        from ..offsite.owner import plugged_model
        processor = load_processor(args.model)
        model = plugged_model(args.model, adapter, args.dtype, family(args)) if adapter else \
            load_model(args.model, args.dtype, family(args))
    if args.lm_eval_tasks:
        try:
            from ..training.lm_eval import run_tasks
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


def add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required,
                   help="local file or directory (train/validation/test .jsonl, .csv, .parquet, "
                        ".txt) or a hub dataset name[:config]")
    add_fields(p, DataConfig, ["block_size"])
    p.add_argument("--max-examples", type=int, default=None)


DTYPE = dict(choices=["float32", "float16", "bfloat16"],
             help="default: the checkpoint's own (config.json), float32 if it names none")
FAMILY_HELP = ("where the model's parts are, when the table and detection get it wrong: a "
               "Family as JSON or a .json file (blocks, embeddings, final_norm, head, "
               "lora_targets); bundles carry it to the data owners")


def add_commands(sub) -> None:
    for add in (_add_emulator, _add_train, _add_plug, _add_evaluate):
        add(sub)


def _add_emulator(sub) -> None:
    # no abbreviated flags: with --recipe, a flag's presence decides what overrides the recipe
    p = sub.add_parser("emulator", allow_abbrev=False,
                       help="model owner: split a model into adapter + emulator bundle")
    p.add_argument("--model", required=True, help="hub name, local path or fl-offsite/<zoo model>")
    p.add_argument("--out", required=True, type=Path, help="bundle directory to create")
    p.add_argument("--recipe", choices=list(RECIPES), help="start from a named recipe sized to "
                   "the model (pretrained-llm: the one measured on SmolLM2-135M; README); the "
                   "split flags given beside it override its settings")
    add_fields(p, SplitConfig, PLAN_FIELDS)
    add_fields(p.add_mutually_exclusive_group(), SplitConfig, SIZE_FIELDS)
    p.add_argument("--layer-selection", choices=list(SELECTIONS), default="uniform",
                   help="which middle blocks to keep: evenly spaced, or the ones that change "
                        "the representation most on --distill-data")
    add_fields(p, SimilaritySelection, ["repeat_blocks"])
    p.add_argument("--compression", choices=list(COMPRESSIONS),
                   help="compress the emulator blocks (int8: 8-bit weights; lowrank: SVD "
                        "factors of every linear layer; channels: MLP channel pruning)")
    add_fields(p, LowRankCompression, ["rank_ratio"])
    add_fields(p, ChannelPruning, ["keep_ratio", "importance"])
    add_fields(p, LowRankCompression, ["allocation"])
    p.add_argument("--block-ratios", type=block_ratios, default={}, help=(
        ChannelPruning.model_fields["block_ratios"].description + "; lowrank's rank ratio or "
        "channels' keep ratio"))
    p.add_argument("--harmonizer-width", type=int, default=None, help="add a trainable "
                   "harmonizer of this bottleneck width after each kept block that stands in "
                   "for dropped ones (ScaleOT-style; trained by --distill-steps; default off; "
                   f"a config's split.harmonizer.width defaults to "
                   f"{BottleneckHarmonizer.model_fields['width'].default})")
    p.add_argument("--dtype", **DTYPE)
    p.add_argument("--family", help=FAMILY_HELP)
    p.add_argument("--max-memory", help="when the emulator needs forward passes (similarity, "
                   "distillation, activation or gradient scores): hold at most this much of "
                   "the full model, e.g. cpu=4GiB,cuda:0=20GiB, the rest offloaded to disk "
                   "beside --out (accelerate); default: load it whole")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("public data (distillation, similarity)")
    add_fields(g, DistillConfig, DISTILL_PREFIXED, "distill-")
    add_fields(g, DistillConfig, DISTILL_PLAIN)
    p.set_defaults(func=cmd_emulator)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="data owner: fine-tune the adapter on the emulator")
    p.add_argument("--bundle", help="bundle directory from `fl-offsite emulator`")
    p.add_argument("--model", help="full model (only with --tuning full)")
    add_data_args(p)
    p.add_argument("--out", required=True, type=Path,
                   help="adapter .safetensors file (model directory with --tuning full)")
    p.add_argument("--dtype", **DTYPE)
    p.add_argument("--family", help=FAMILY_HELP)
    p.add_argument("--overwrite", action="store_true")
    g = p.add_argument_group("training")
    g.add_argument("--tuning", choices=["blocks", "lora", "bitfit", "full"], default="blocks",
                   help="what to train: adapter blocks (default), LoRA or BitFit inside them, "
                        "or the whole model (baseline; needs --model)")
    add_fields(g, TrainConfig, TrainConfig.model_fields)
    g.add_argument("--seed", type=int, default=0)
    add_fields(g, TuningConfig, LORA_FIELDS)
    p.set_defaults(func=cmd_train)


def _add_plug(sub) -> None:
    p = sub.add_parser("plug", help="model owner: plug an adapter into the full model")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True, help="adapter file or bundle directory")
    p.add_argument("--out", required=True, type=Path, help="model directory to write")
    p.add_argument("--dtype", choices=DTYPE["choices"],
                   help="of the written model (default: the checkpoint's own)")
    p.add_argument("--family", help=FAMILY_HELP)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_plug)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics of a full, emulated or plugged-in model")
    p.add_argument("--model", help="full model (with --adapter: plugged in)")
    p.add_argument("--bundle", help="emulated model (with --adapter: the adapter on the emulator)")
    p.add_argument("--adapter", help="adapter file or bundle directory")
    add_data_args(p, required=False)
    p.add_argument("--lm-eval-tasks", help="comma-separated lm-eval task names (needs the "
                                          "lm-eval extra and hub access), instead of --data")
    p.add_argument("--split", default="test")
    p.add_argument("--out", type=Path, default=Path("metrics.json"), help="metrics JSON file")
    p.add_argument("--dtype", **DTYPE)
    p.add_argument("--family", help=FAMILY_HELP)
    p.set_defaults(func=cmd_evaluate)
