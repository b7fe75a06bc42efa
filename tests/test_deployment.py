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


class Deployment:
    """A SuperLink with TLS and SuperNode authentication on this host, the README's commands:
    certificates, registered node keys, a Flower home per process; stopped by PID."""

    def __init__(self, nodes: int = 3):
        self.base = Path(tempfile.mkdtemp(prefix="flo-dep-"))  # short paths for sockets, logs
        self.certs = self.base / "certs"
        subprocess.run([sys.executable, "simulations/make_certs.py", "--out", str(self.certs),
                        "--nodes", str(nodes), "--host", "127.0.0.1", "--host", "localhost"],
                       cwd=ROOT, check=True, capture_output=True, timeout=60)
        self.ca = str(self.certs / "ca.crt")
        self.port = _free_port()
        self.superlink = f"127.0.0.1:{self.port}"
        (self.base / "tmp").mkdir()
        # the apps import fl_offsite: PYTHONPATH makes that independent of each process's cwd
        self.env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "TMPDIR": str(self.base / "tmp"),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                os.environ.get("PYTHONPATH")]))}
        self.homes = {name: self.base / f"home-{name}" for name in
                      ["link", *map(str, range(1, nodes + 1))]}
        for home in self.homes.values():
            home.mkdir()
        # the `flwr` CLI's SuperLink connection, in the model owner's Flower home
        (self.homes["link"] / "config.toml").write_text(
            f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = '
            f'"{self.superlink}"\nroot-certificates = "{self.ca}"\n')
        self.link_env = {**self.env, "FLWR_HOME": str(self.homes["link"])}
        self.procs = Processes(self.base, self.link_env)

    def start_superlink(self, registered=(1, 2)) -> None:
        link = self.procs.start("superlink", [
            "flower-superlink", "--ssl-ca-certfile", self.ca, "--ssl-certfile",
            str(self.certs / "server.pem"), "--ssl-keyfile", str(self.certs / "server.key"),
            "--enable-supernode-auth", "--port", str(self.port)])
        _wait_for_port(self.port, link)
        for i in registered:
            reg = subprocess.run(["flwr", "supernode", "register",
                                  str(self.certs / f"node-{i}.pub"), "deploy"], cwd=ROOT,
                                 env=self.link_env, capture_output=True, text=True, timeout=120)
            assert reg.returncode == 0 and "registered successfully" in reg.stdout, \
                reg.stdout + reg.stderr

    def supernode(self, i: int, *extra: str, name: str = "", data: Path | None = None
                  ) -> subprocess.Popen:
        node_config = (f"data-path='{data or self.base / f'data-{i}'}' node-name='owner-{i}' "
                       f"cache-dir='{self.base / f'cache-{i}'}'")
        return self.procs.start(name or f"supernode-{i}", [
            "flower-supernode", "--superlink", self.superlink, *extra,
            "--node-config", node_config, "--port", str(_free_port())],
            env={**self.env, "FLWR_HOME": str(self.homes[str(i)]), "OMP_NUM_THREADS": "1"})

    def trusted_supernode(self, i: int, **kwargs) -> subprocess.Popen:
        return self.supernode(i, "--root-certificates", self.ca,
                              "--auth-supernode-private-key", str(self.certs / f"node-{i}"),
                              **kwargs)

    def run(self, run_config: str, timeout: float) -> dict:
        """``flwr run . deploy``; the run's summary.json."""
        out = self.base / "run"
        try:
            run = subprocess.run(
                ["flwr", "run", ".", "deploy", "--stream", "--run-config",
                 f"{run_config} out='{out}'"],
                cwd=ROOT, env=self.link_env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"flwr run timed out:\n{(exc.stdout or b'')[-3000:]!r}\n"
                                 f"{self.procs.tails()}") from None
        logs = run.stdout + run.stderr
        assert (out / "summary.json").is_file(), logs[-3000:] + self.procs.tails()
        return json.loads((out / "summary.json").read_text())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        leftovers = self.procs.stop_all()
        shutil.rmtree(self.base, ignore_errors=True)
        assert not leftovers, leftovers


def test_deployment_with_tls_and_supernode_auth():
    with Deployment() as dep:
        dep.start_superlink()
        # refused: an unregistered key, and a node that does not trust the SuperLink's CA
        unregistered = dep.supernode(3, "--root-certificates", dep.ca,
                                     "--auth-supernode-private-key", str(dep.certs / "node-3"))
        no_ca = dep.supernode(3, "--auth-supernode-private-key", str(dep.certs / "node-3"),
                              name="supernode-3-no-ca")
        for name, proc in (("supernode-3", unregistered), ("supernode-3-no-ca", no_ca)):
            try:
                code = proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} was not refused:\n{dep.procs.tails()}") from None
            assert code != 0, dep.procs.log(name)
            assert "Failed to initialize the connection to the SuperLink" in \
                dep.procs.log(name), dep.procs.log(name)
        assert "Failed to activate SuperNode" in dep.procs.log("supernode-3")  # [code: 2004]
        assert "certificate" in dep.procs.log("supernode-3-no-ca").lower()  # TLS verification

        _split_devil(dep.base)
        for i in (1, 2):
            dep.trusted_supernode(i)
        summary = dep.run("rounds=2 num_clients=2 clients_per_round=2 "
                          "bundle_transport='message'", timeout=420)
        assert [r["round"] for r in summary["rounds"]] == [1, 2]
        for record in summary["rounds"]:
            assert record["clients_ok"] == 2, record
            assert record["participants"] == ["owner-1", "owner-2"], record
            assert record["plugin"]["ppl"] < summary["zero_shot"]["ppl"], record
        assert [r["bundles_sent"] for r in summary["rounds"]] == [2, 0]
        for i in (1, 2):  # the bundle came by message into each node's own cache
            assert list((dep.base / f"cache-{i}" / "bundles").iterdir()), dep.procs.tails()


def big_checkpoint(path: Path, hidden: int = 1536) -> int:
    """A LLaMA-shaped checkpoint built from a config (8 blocks, the packaged reference model's
    tokenizer), written tensor by tensor; returns its parameter count."""
    import torch
    import transformers as T
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    tokenizer = ROOT / "fl_offsite" / "zoo" / "ref-opt"
    config = T.LlamaConfig(vocab_size=json.loads((tokenizer / "config.json").read_text())
                           ["vocab_size"], hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                           num_hidden_layers=8, num_attention_heads=hidden // 64,
                           num_key_value_heads=hidden // 64, tie_word_embeddings=False,
                           pad_token_id=1, bos_token_id=2, eos_token_id=2)
    with init_empty_weights():
        skeleton = T.AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True)
    config.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, path / name)
    generator = torch.Generator().manual_seed(0)
    state = {name: (torch.randn(p.shape, generator=generator) * (0.02 if p.dim() > 1 else 0.0)
                    + (1.0 if p.dim() == 1 else 0.0)) for name, p in skeleton.state_dict().items()}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return sum(t.numel() for t in state.values())


def test_a_bundle_of_hundreds_of_megabytes_crosses_a_tls_superlink():
    """The bundle travels inside Flower messages through the SuperLink to two SuperNodes."""
    with Deployment(nodes=2) as dep:
        params = big_checkpoint(dep.base / "model")
        dep.start_superlink()
        _split_devil(dep.base, size=16)
        for i in (1, 2):
            dep.trusted_supernode(i)
        config = dep.base / "big.yaml"  # keys beyond pyproject's run config go in a YAML
        config.write_text(f"name: big\nmodel: {dep.base / 'model'}\nsplit: {{emulator_layers: 2}}"
                          "\ndata: {path: fl-offsite/devil, block_size: 32, "
                          "max_eval_examples: 4}\ntrain: {max_steps: 1, batch_size: 2}\n"
                          "evaluate_emulator: false\n")
        summary = dep.run(f"config='{config}' rounds=1 num_clients=2 clients_per_round=2 "
                          "bundle_transport='message'", timeout=900)
        (record,) = summary["rounds"]
        assert summary["bundle"]["bytes"] >= 600 * 2**20, summary["bundle"]
        assert record["clients_ok"] == 2 and record["bundles_sent"] == 2, record
        print(f"bundle {summary['bundle']['bytes'] / 2**20:.0f} MB to 2 SuperNodes by message "
              f"through the TLS SuperLink: {record['seconds_bundles']:.1f} s")
        for i in (1, 2):
            (cached,) = (dep.base / f"cache-{i}" / "bundles").iterdir()
            assert sum(f.stat().st_size for f in cached.iterdir()) >= 600 * 2**20
        assert params > 150e6
