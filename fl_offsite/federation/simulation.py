"""Running a federation as a Flower simulation on Ray, in this process.

Uses ``flwr.simulation.run_simulation``: it is the in-process path and re-raises the
ServerApp's errors, so a failed run makes ``fl-offsite simulate`` exit non-zero. Ray's
session files and every cache the run writes stay inside the run directory (Ray gets a short
symlink to it, because its socket paths must stay under 108 characters).

Ray is started here, before ``run_simulation`` starts the ServerApp's thread: Ray forks its
processes with a Python pre-exec hook, and a fork while another thread holds a lock can hang
the child for good (seen once in a reproduction: 37 minutes stuck in Ray's start). Flower's
backend skips ``ray.init`` when Ray is up and shuts it down when the run ends; the ``finally``
here shuts it down when the run fails before that.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

from ..config import Config
from ..errors import UserError
from ..quiet import quiet_libraries


def check_resources(cfg: Config) -> None:
    from ..models.loading import resolve_device

    resolve_device(cfg.owner_device)  # the model owner runs in this process
    if cfg.resources.num_gpus > 0:
        import torch
        if not torch.cuda.is_available():
            raise UserError(f"resources.num_gpus: {cfg.resources.num_gpus} GPUs per client asked "
                            "for, but no CUDA GPU is visible; set resources.num_gpus=0")
        gpus = torch.cuda.device_count()
        if cfg.ray_address is None and cfg.resources.num_gpus > gpus:
            raise UserError(f"resources.num_gpus: {cfg.resources.num_gpus} GPUs per client, but "
                            f"this machine has {gpus}; use at most {gpus} (fractions share one)")
    cpus = os.cpu_count() or 1
    if cfg.ray_address is None and cfg.resources.num_cpus > cpus:
        raise UserError(f"resources.num_cpus: {cfg.resources.num_cpus} CPUs per client, but this "
                        f"machine has {cpus}; use at most {cpus}")


@contextlib.contextmanager
def _environment(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _short_link(target: Path):
    """A short path (under the system temp dir) pointing at ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    link = Path(tempfile.mkdtemp(prefix="flo-")) / "r"
    link.symlink_to(target.resolve())
    try:
        yield link
    finally:
        link.unlink()
        link.parent.rmdir()


@contextlib.contextmanager
def _ray_started(init_args: dict):
    """Ray up in this thread for the block, with this process's import path; down after it."""
    import ray

    path = os.pathsep.join(filter(None, [*sys.path, os.environ.get("PYTHONPATH")]))
    with _environment(PYTHONPATH=path):
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": path}}, **init_args)
        try:
            yield
        finally:
            ray.shutdown()


def simulate(cfg: Config, run_dir: Path, verbose: bool = False, resume: bool = False) -> dict:
    """Run the federation on Flower's Ray backend; returns the run summary."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from ..client_app import app as client_app
    from .memory import PARALLEL_ENV, parallel_clients
    from .recovery import recovering_ray_backend
    from .server import run_federation

    check_resources(cfg)
    result: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:
        result.update(run_federation(grid, cfg, run_dir, resume))

    cache = run_dir / "cache"
    if not verbose:
        quiet_libraries()
    # the data owners' memory check shares this machine's memory among those running at once
    parallel = {} if cfg.ray_address else {PARALLEL_ENV: str(parallel_clients(cfg))}
    from ..models.gguf import MODEL_CACHE_ENV, cache_dir

    # the run's caches stay in the run; converted and fetched models stay where the user has them
    with _short_link(run_dir / "ray") as ray_tmp, _environment(
            HF_DATASETS_CACHE=str(cache / "datasets"), FL_OFFSITE_CACHE=str(cache),
            **{MODEL_CACHE_ENV: str(cache_dir())},
            FLWR_HOME=str(cache / "flwr"), RAY_DEDUP_LOGS="0", TOKENIZERS_PARALLELISM="false",
            RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0", **parallel):
        init_args = {"include_dashboard": False, "logging_level": "ERROR",
                     "log_to_driver": verbose}
        if cfg.ray_address:
            init_args["address"] = cfg.ray_address
        else:
            init_args["_temp_dir"] = str(ray_tmp)
        backend_config = {
            "client_resources": {"num_cpus": cfg.resources.num_cpus,
                                 "num_gpus": cfg.resources.num_gpus},
            "init_args": init_args,
        }
        with _ray_started(init_args), recovering_ray_backend():
            run_simulation(server_app=server_app, client_app=client_app,
                           num_supernodes=cfg.num_clients, backend_name="ray",
                           backend_config=backend_config, verbose_logging=verbose)
    if "rounds" not in result or len(result["rounds"]) != cfg.rounds:
        raise RuntimeError(f"simulation stopped before the last round; see {run_dir}")
    return result
