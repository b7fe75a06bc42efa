"""Stopping the local SuperLink that ``flwr run`` leaves behind, and only that one: the
process whose command line names ``flower-superlink`` and this Flower home (another user's or
another project's SuperLink on the same machine is left alone)."""

from __future__ import annotations

from pathlib import Path

import psutil


def superlinks_of(flwr_home: Path) -> list[psutil.Process]:
    home = str(Path(flwr_home).resolve())
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(Path(arg).name == "flower-superlink" for arg in cmdline[:2]) and \
                any(home in arg for arg in cmdline):
            found.append(proc)
    return found


def stop_superlinks(flwr_home: Path, grace: float = 10.0) -> list[int]:
    """SIGTERM each SuperLink of ``flwr_home``, SIGKILL what is still there after ``grace``
    seconds; returns their PIDs."""
    procs = superlinks_of(flwr_home)
    for proc in procs:
        proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        proc.kill()
    psutil.wait_procs(alive, timeout=grace)
    return [p.pid for p in procs]
