"""``fl-offsite simulate | offsite | stop-superlink | report``: the federated commands."""

from __future__ import annotations

import argparse
from pathlib import Path

OFFSITE_OVERRIDES = {"num_clients": 1, "clients_per_round": 1, "min_clients": 1,
                     "partition.name": "iid"}


def _run(args, extra: dict | None = None, kind: str = "") -> None:
    from .. import config as configs
    from ..errors import UserError

    overrides = dict(configs.parse_override(o) for o in args.set or [])
    overrides.update(extra or {})
    if args.resume:
        if args.config or args.out:
            raise UserError("--resume: takes the run directory's own config; drop "
                            "--config/--out (use --set to change e.g. rounds)")
        from ..federation.runtime import resume_config
        cfg = resume_config(args.resume, overrides)
    else:
        if not args.config:
            raise UserError("--config: required (or --resume RUN_DIR)")
        cfg = configs.load(args.config, overrides, "--set")  # refused here in about a second
    from ..federation.runtime import check_resumable, new_run_dir, preflight
    from ..federation.simulation import simulate
    from ..fileio import atomic_write_bytes

    preflight(cfg)
    if args.resume:
        run_dir = args.resume
        check_resumable(run_dir, cfg)
        atomic_write_bytes(run_dir / "config.yaml", configs.dump(cfg).encode())
    else:
        run_dir = new_run_dir(cfg, args.out, kind)
    summary = simulate(cfg, run_dir, verbose=args.verbose, resume=bool(args.resume))
    metric = summary["main_metric"]
    last = summary["rounds"][-1]["plugin"].get(metric)
    print(f"done: plug-in {metric} {last:.4g} vs zero-shot {summary['zero_shot'][metric]:.4g}; "
          f"run directory {run_dir} (summary.json, adapter.safetensors, tensorboard/)")


def cmd_simulate(args) -> None:
    _run(args)


def cmd_offsite(args) -> None:
    _run(args, OFFSITE_OVERRIDES, kind="offsite")


def cmd_report(args) -> None:
    from ..federation.report import render

    for path in render(Path(args.run_dir)):
        print(path)


def cmd_stop_superlink(args) -> None:
    from ..federation.superlink import stop_superlinks

    stopped = stop_superlinks(args.flwr_home)
    print(f"stopped SuperLink PID {', '.join(map(str, stopped))}" if stopped else
          f"no SuperLink of {args.flwr_home} is running")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config, e.g. configs/demo.yaml")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue an interrupted run after its last complete round")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key (dotted), e.g. --set rounds=2 --set "
                        "strategy.name=fedprox; repeatable")
    p.add_argument("--out", type=Path, help="run directory (default runs/<name>-<timestamp>, "
                                            "runs/<name>-offsite-<timestamp> for offsite)")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")


def add_commands(sub) -> None:
    p = sub.add_parser("simulate", help="multi-client federated offsite-tuning on Flower + Ray")
    _add_run_args(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("offsite", help="single-client offsite-tuning (the paper's setting), "
                                       "same apps")
    _add_run_args(p)
    p.set_defaults(func=cmd_offsite)

    p = sub.add_parser("stop-superlink", help="stop the local SuperLink `flwr run` left "
                                             "running for this Flower home (and no other)")
    p.add_argument("--flwr-home", type=Path, required=True, help="the FLWR_HOME of the run")
    p.set_defaults(func=cmd_stop_superlink)

    p = sub.add_parser("report", help="render a run's curves to PNG files in its directory")
    p.add_argument("run_dir", help="run directory holding summary.json")
    p.set_defaults(func=cmd_report)
