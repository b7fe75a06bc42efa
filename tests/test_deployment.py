"""A real deployment on one host: SuperLink (TLS, SuperNode authentication) + two SuperNodes.

The commands are the ones README.md gives under "Deploy for real (SuperLink + SuperNodes)".
Each SuperNode has its own Flower home, bundle cache and ``data-path`` (160 lines of the
packaged Devil's Dictionary train split each); the bundle travels inside Flower messages.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]
DEVIL = ROOT / "fl_offsite" / "datasets" / "devil"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "flower-superlink exited early"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Processes:
    """Every process this test starts, with a log file each; stopped by PID, children first."""

    def __init__(self, base: Path, env: dict):
        self.base, self.env = base, env
        self.started: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, psutil.Process] = {}

    def start(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.base / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=log,
                                stderr=subprocess.STDOUT)
        log.close()
        self.started[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.base / f"{name}.log").read_text(errors="replace")

    def tails(self) -> str:
        return "\n".join(f"--- {n} ---\n{self.log(n)[-2500:]}" for n in self.started)

    def _remember_children(self) -> None:
        """Descendants, and the ``flower-superexec`` helpers of exited ones (which carry
        ``--parent-pid PID`` and outlive a parent that exited, until they notice)."""
        ours = {str(p.pid) for p in self.started.values()}
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if "--parent-pid" in cmd[:-1] and cmd[cmd.index("--parent-pid") + 1] in ours:
                self.seen.setdefault(proc.pid, proc)
        for proc in [*self.started.values(), *list(self.seen.values())]:
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    self.seen.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                pass

    def stop_all(self) -> list[str]:
        """Terminate (then kill) everything started, and their descendants; returns leftovers."""
        self._remember_children()
        for proc in list(self.seen.values()) + [psutil.Process(p.pid) for p in
                                                  self.started.values() if p.poll() is None]:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        for proc in self.started.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        _, alive = psutil.wait_procs(list(self.seen.values()), timeout=10)
        for proc in alive:
            proc.kill()
        _, alive = psutil.wait_procs(alive, timeout=10)
        return [f"{p.pid} {p.name()}" for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def _split_devil(base: Path, size: int = 160) -> list[Path]:
    """Two data owners: ``size`` lines of the packaged train split each (alternating)."""
    lines = (DEVIL / "train.jsonl").read_text().splitlines()[:2 * size]
    dirs = []
    for i in (1, 2):
        d = base / f"data-{i}"
        d.mkdir()
        (d / "train.jsonl").write_text("\n".join(lines[i - 1::2]) + "\n")
        dirs.append(d)
    return dirs


def test_deployment_with_tls_and_supernode_auth():
    base = Path(tempfile.mkdtemp(prefix="flo-dep-"))  # short paths for sockets and logs
    certs = base / "certs"  # node-3's key is never registered
    subprocess.run([sys.executable, "simulations/make_certs.py", "--out", str(certs), "--nodes",
                    "3", "--host", "127.0.0.1", "--host", "localhost"], cwd=ROOT, check=True,
                   capture_output=True, timeout=60)
    ca = str(certs / "ca.crt")
    port = _free_port()
    superlink = f"127.0.0.1:{port}"
    out = base / "run"
    (base / "tmp").mkdir()
    # the apps import fl_offsite: PYTHONPATH makes that independent of each process's cwd
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "TMPDIR": str(base / "tmp"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    homes = {name: base / f"home-{name}" for name in ("link", "1", "2", "3")}
    for home in homes.values():
        home.mkdir()
    # the `flwr` CLI's SuperLink connection, in the model owner's Flower home
    (homes["link"] / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "{superlink}"\n'
        f'root-certificates = "{ca}"\n')
    link_env = {**env, "FLWR_HOME": str(homes["link"])}
    procs = Processes(base, link_env)
    try:
        link = procs.start("superlink", [
            "flower-superlink", "--ssl-ca-certfile", ca, "--ssl-certfile",
            str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
            "--enable-supernode-auth", "--port", str(port)])
        _wait_for_port(port, link)
        for i in (1, 2):
            reg = subprocess.run(["flwr", "supernode", "register", str(certs / f"node-{i}.pub"),
                                  "deploy"], cwd=ROOT, env=link_env, capture_output=True,
                                 text=True, timeout=120)
            assert reg.returncode == 0 and "registered successfully" in reg.stdout, \
                reg.stdout + reg.stderr

        def supernode(i: int, *extra: str, name: str = "") -> subprocess.Popen:
            node_config = (f"data-path='{base / f'data-{i}'}' node-name='owner-{i}' "
                           f"cache-dir='{base / f'cache-{i}'}'")
            return procs.start(name or f"supernode-{i}", [
                "flower-supernode", "--superlink", superlink, *extra,
                "--node-config", node_config, "--port", str(_free_port())],
                env={**env, "FLWR_HOME": str(homes[str(i)]), "OMP_NUM_THREADS": "1"})

        # refused: an unregistered key, and a node that does not trust the SuperLink's CA
        unregistered = supernode(3, "--root-certificates", ca,
                                 "--auth-supernode-private-key", str(certs / "node-3"))
        no_ca = supernode(3, "--auth-supernode-private-key", str(certs / "node-3"),
                          name="supernode-3-no-ca")
        for name, proc in (("supernode-3", unregistered), ("supernode-3-no-ca", no_ca)):
            try:
                code = proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} was not refused:\n{procs.tails()}") from None
            assert code != 0, procs.log(name)
            assert "Failed to initialize the connection to the SuperLink" in procs.log(name), \
                procs.log(name)
        assert "Failed to activate SuperNode" in procs.log("supernode-3")  # [code: 2004]
        assert "certificate" in procs.log("supernode-3-no-ca").lower()  # TLS verification

        _split_devil(base)
        for i in (1, 2):
            supernode(i, "--root-certificates", ca,
                      "--auth-supernode-private-key", str(certs / f"node-{i}"))
        try:
            run = subprocess.run(
                ["flwr", "run", ".", "deploy", "--stream", "--run-config",
                 f"rounds=2 num_clients=2 clients_per_round=2 bundle_transport='message' "
                 f"out='{out}'"],
                cwd=ROOT, env=link_env, capture_output=True, text=True, timeout=420)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"flwr run timed out:\n{(exc.stdout or b'')[-3000:]!r}\n"
                                 f"{procs.tails()}") from None
        logs = run.stdout + run.stderr
        assert (out / "summary.json").is_file(), logs[-3000:] + procs.tails()
        summary = json.loads((out / "summary.json").read_text())
        assert [r["round"] for r in summary["rounds"]] == [1, 2]
        for record in summary["rounds"]:
            assert record["clients_ok"] == 2, record
            assert record["participants"] == ["owner-1", "owner-2"], record
            assert record["plugin"]["ppl"] < summary["zero_shot"]["ppl"], record
        assert [r["bundles_sent"] for r in summary["rounds"]] == [2, 0]
        for i in (1, 2):  # the bundle came by message into each node's own cache
            assert list((base / f"cache-{i}" / "bundles").iterdir()), procs.tails()
    finally:
        leftovers = procs.stop_all()
        shutil.rmtree(base, ignore_errors=True)
    assert not leftovers, leftovers
