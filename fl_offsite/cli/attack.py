"""``fl-offsite attack``: the privacy harness (what a data owner gets from the bundle alone)."""

from __future__ import annotations

import json
from pathlib import Path

from ..training.config import TrainConfig
from .flags import add_fields
from .offsite import DTYPE, FAMILY_HELP, add_data_args, existing, family, train_config


def cmd_attack(args) -> None:
    from ..fileio import atomic_write_json
    from ..models.loading import load_processor
    from ..offsite.attack import attacks_for, margin
    from ..offsite.emulated import EmulatedModel
    from ..training import data
    from ..training.evaluate import evaluate

    bundle = existing(args.bundle, "--bundle")
    processor = load_processor(bundle)
    train_items = data.prepare(args.data, "train", processor, args.block_size,
                               args.max_examples).train_items
    test = data.prepare(args.data, args.split, processor, args.block_size, args.max_eval)
    cfg, pad_id = train_config(args), getattr(processor, "pad_token_id", 0) or 0
    record = {"bundle": str(bundle), "data": args.data, "split": args.split,
              "train": cfg.model_dump(), "attacks": {}}
    for name, attack in attacks_for(train_items).items():
        emulated = EmulatedModel(bundle)
        record["attacks"][name] = evaluate(attack(emulated, train_items, cfg, pad_id,
                                                  args.seed), test, processor)
        print(json.dumps({"attack": name, **record["attacks"][name]}), flush=True)
        if name == "adapter only":  # what the honest data owner sends back
            honest = emulated.adapter()
    if args.model:
        from ..offsite.owner import plugged_model

        plugged = plugged_model(args.model, honest, args.dtype, family(args))
        record["plugin"] = evaluate(plugged, test, processor)
        record.update(margin(record["plugin"], record["attacks"]))
        print(json.dumps({"plugin": record["plugin"], "best_attack": record["best_attack"],
                          "margin": record["margin"]}))
    atomic_write_json(args.out, record)


def add_commands(sub) -> None:
    p = sub.add_parser("attack", help="privacy harness: what a data owner reaches with the "
                                      "bundle alone (and, with --model, plug-in's margin)")
    p.add_argument("--bundle", required=True, help="bundle directory from `fl-offsite emulator`")
    p.add_argument("--model", help="the full model: also train the honest adapter, plug it in "
                                   "and report plug-in minus the best attack")
    add_data_args(p)
    p.add_argument("--split", default="test", help="evaluation split")
    p.add_argument("--max-eval", type=int, default=None, help="evaluation examples")
    p.add_argument("--out", type=Path, default=Path("attack.json"), help="results JSON file")
    p.add_argument("--dtype", **DTYPE)
    p.add_argument("--family", help=FAMILY_HELP)
    g = p.add_argument_group("training (the same budget for every attack)")
    add_fields(g, TrainConfig, TrainConfig.model_fields)
    g.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_attack)
