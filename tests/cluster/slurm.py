"""A real SLURM cluster for the tests, started without systemd and stopped by PID.

- ``SlurmCluster(nodes=1)``: slurmctld + one slurmd on this machine (``config_overrides``).
- ``SlurmCluster(nodes=2, namespaces=True)``: every slurmd in its own network + UTS namespace
  (its own hostname and IP, joined by a bridge), so a 2-node job really crosses a network.

Slurm and munge come from Debian packages (installed here with apt-get when missing). munged runs
as ``munge`` on a private socket; every state, spool, pid and log file lives in a temporary
directory. ``stop()`` kills exactly the daemons ``start()`` started (their process groups), then
removes the namespaces, links and ``/etc/hosts`` lines it added. It is idempotent and also runs
at interpreter exit. The recipe's facts are in ``../shared/RESOURCES.md`` (section SLURM).
"""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "munged"]
HOSTS = Path("/etc/hosts")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def ensure_installed() -> None:
    """apt-get install the Slurm and munge packages once (a lock keeps parallel installs apart)."""
    if all(shutil.which(b) or Path(f"/usr/sbin/{b}").exists() for b in BINARIES):
        return
    with open("/tmp/bigtrain-slurm-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(shutil.which(b) or Path(f"/usr/sbin/{b}").exists() for b in BINARIES):
            return
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run("apt-get", "update", "-qq", env=env)
        _run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES, env=env)


class SlurmCluster:
    def __init__(self, nodes: int = 1, namespaces: bool = False, cpus_per_node: int = 2):
        self.nodes, self.namespaces, self.cpus = nodes, namespaces, cpus_per_node
        self.tag = f"bt{os.getpid() % 100000}"
        self.node_names = [f"{self.tag}n{i + 1}" for i in range(nodes)]
        self.dir: Optional[Path] = None
        self.procs: list[subprocess.Popen] = []
        self.netns: list[str] = []
        self.links: list[str] = []
        self.hosts_marker = f"# bigtrain-test-cluster {self.tag}"
        self.env: dict[str, str] = {}
        self.job_env: dict[str, str] = {"GLOO_SOCKET_IFNAME": "eth0"} if namespaces else {}
        self._stopped = True

    # -- can this machine run it? ---------------------------------------------------------------
    @staticmethod
    def skip_reason(nodes: int = 1, namespaces: bool = False) -> Optional[str]:
        if os.geteuid() != 0:
            return "the test SLURM cluster needs root (daemons, /etc/hosts, namespaces)"
        have = all(shutil.which(b) or Path(f"/usr/sbin/{b}").exists() for b in BINARIES)
        if not have and not shutil.which("apt-get"):
            return "Slurm is not installed and there is no apt-get to install it"
        if namespaces:
            for tool in ("ip", "nsenter", "unshare"):
                if not shutil.which(tool):
                    return f"emulated nodes need `{tool}` (iproute2 / util-linux)"
            probe = f"btprobe{os.getpid() % 100000}"
            if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode:
                return "this machine cannot create network namespaces (ip netns add failed)"
            subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return None

    # -- start ----------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> "SlurmCluster":
        ensure_installed()
        self._stopped = False
        atexit.register(self.stop)
        self.dir = Path(tempfile.mkdtemp(prefix=f"slurm-{self.tag}-"))
        self.dir.chmod(0o755)
        try:
            addrs = self._network()
            self._start_munge()
            conf = self._write_conf(addrs)
            self.env = {"SLURM_CONF": str(conf)}
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(conf)])
            time.sleep(0.5)
            for i, name in enumerate(self.node_names):
                cmd = ["slurmd", "-D", "-N", name, "-f", str(conf)]
                if self.namespaces:
                    cmd = ["nsenter", f"--net=/var/run/netns/{self.netns[i]}", "unshare", "--uts", "sh", "-c",
                           f"hostname {name}; exec " + " ".join(cmd)]
                self._spawn(f"slurmd-{name}", cmd)
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        log = open(self.dir / f"{name}.stdout", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kw))

    def _start_munge(self) -> None:
        mdir = self.dir / "munge"
        mdir.mkdir()
        shutil.chown(mdir, "munge", "munge")
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            _run("mungekey", "-c", "-k", str(key))
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        self.munge_socket = mdir / "munge.socket"
        self._spawn("munged", ["setpriv", "--reuid=munge", "--regid=munge", "--init-groups", "/usr/sbin/munged", "-F",
                               f"--socket={self.munge_socket}", f"--key-file={key}", f"--pid-file={mdir / 'munged.pid'}",
                               f"--log-file={mdir / 'munged.log'}", f"--seed-file={mdir / 'munged.seed'}"])
        deadline = time.time() + 10
        while not self.munge_socket.exists():
            if time.time() > deadline or self.procs[-1].poll() is not None:
                raise RuntimeError(f"munged did not start: {(self.dir / 'munged.stdout').read_text()}")
            time.sleep(0.05)

    def _network(self) -> list[str]:
        """Node addresses; with namespaces, builds a bridge and one namespace + veth per node."""
        if not self.namespaces:
            self._add_hosts([("127.0.0.1", n) for n in self.node_names])
            return ["127.0.0.1"] * self.nodes
        subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
        bridge = f"{self.tag}br"
        _run("ip", "link", "add", bridge, "type", "bridge")
        self.links.append(bridge)
        _run("ip", "addr", "add", f"{subnet}.1/24", "dev", bridge)
        _run("ip", "link", "set", bridge, "up")
        self.ctld_addr = f"{subnet}.1"
        addrs = []
        for i, name in enumerate(self.node_names):
            ns, host_end = f"{self.tag}ns{i + 1}", f"{self.tag}v{i + 1}"
            _run("ip", "netns", "add", ns)
            self.netns.append(ns)
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text("# no nameserver: names come from /etc/hosts\n")
            _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self.links.append(host_end)
            _run("ip", "link", "set", host_end, "master", bridge)
            _run("ip", "link", "set", host_end, "up")
            addr = f"{subnet}.{i + 2}"
            for cmd in (["ip", "addr", "add", f"{addr}/24", "dev", "eth0"], ["ip", "link", "set", "eth0", "up"],
                        ["ip", "link", "set", "lo", "up"]):
                _run("ip", "netns", "exec", ns, *cmd)
            addrs.append(addr)
        self._add_hosts(list(zip(addrs, self.node_names)))
        return addrs

    def _add_hosts(self, entries: list[tuple[str, str]]) -> None:
        with open(HOSTS, "a") as fh:
            for addr, name in entries:
                fh.write(f"{addr} {name} {self.hosts_marker}\n")

    def _write_conf(self, addrs: list[str]) -> Path:
        d = self.dir
        host = socket.gethostname()
        ctld = f"{host}({self.ctld_addr})" if self.namespaces else host
        lines = [
            "ClusterName=bigtrain-test",
            f"SlurmctldHost={ctld}",
            f"SlurmctldPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            f"AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"CredType=cred/munge",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "ReturnToService=2", "MailProg=/bin/true", "KillWait=5", "MinJobAge=600",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt", f"JobCompLoc={d / 'jobcomp.txt'}",
            f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool-%n'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={d / 'slurmctld.log'}", f"SlurmdLogFile={d / 'slurmd-%n.log'}",
            "SlurmctldTimeout=30", "SlurmdTimeout=30", "InactiveLimit=0",
            "SchedulerParameters=batch_sched_delay=0",
        ]
        if not self.namespaces:
            lines.append("SlurmdParameters=config_overrides")
        for name, addr in zip(self.node_names, addrs):
            node_host = host if not self.namespaces else name
            lines.append(f"NodeName={name} NodeHostname={node_host} NodeAddr={addr} Port={_free_port()} "
                         f"CPUs={self.cpus} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE "
                     "OverSubscribe=YES State=UP")
        (d / "state").mkdir()
        conf = d / "slurm.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        out = ""
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a Slurm daemon exited ({p.args[0]} rc {p.returncode}):\n{self.logs()}")
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True,
                                  env={**os.environ, **self.env})
            out = proc.stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if set(states) == set(self.node_names) and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.3)
        raise RuntimeError(f"nodes not idle after {timeout} s (sinfo: {out.strip()!r}):\n{self.logs()}")

    def logs(self) -> str:
        if self.dir is None:
            return ""
        return "\n".join(f"== {p.name}\n" + p.read_text(errors="replace")[-3000:]
                         for p in sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*.stdout")))

    # -- stop -----------------------------------------------------------------------------------
    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.env and any(p.poll() is None for p in self.procs):  # end running jobs (their slurmstepd)
            env = {**os.environ, **self.env}
            jobs = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True, env=env).stdout.split()
            if jobs:
                subprocess.run(["scancel", "--full", *jobs], capture_output=True, env=env)
                deadline = time.time() + 15
                while time.time() < deadline and subprocess.run(
                        ["squeue", "-h", "-o", "%A"], capture_output=True, text=True, env=env).stdout.strip():
                    time.sleep(0.3)
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        self.procs.clear()
        for ns in self.netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        self.netns.clear()
        self.links.clear()
        if HOSTS.exists():
            kept = [line for line in HOSTS.read_text().splitlines(keepends=True) if self.hosts_marker not in line]
            HOSTS.write_text("".join(kept))
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        atexit.unregister(self.stop)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]
