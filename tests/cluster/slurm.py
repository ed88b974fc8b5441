"""A real SLURM cluster for the tests, started without systemd and stopped by PID.

- ``SlurmCluster(nodes=1)``: slurmctld + one slurmd on this machine (``config_overrides``).
- ``SlurmCluster(nodes=2, namespaces=True)``: every slurmd in its own network + UTS namespace
  (its own hostname and IP, joined by a bridge), so a 2-node job really crosses a network.

Slurm and munge come from Debian packages (installed here with apt-get when missing). munged runs
as ``munge`` on a private socket; every state, spool, pid and log file lives in a temporary
directory. ``stop()`` kills exactly the daemons ``start()`` started (their process groups), then
removes the namespaces, links and ``/etc/hosts`` lines it added. It is idempotent and also runs
at interpreter exit and on SIGTERM/SIGHUP; lines a killed run left in ``/etc/hosts`` go at the next
start. The recipe's facts are in ``../shared/RESOURCES.md`` (section SLURM).
"""

from __future__ import annotations

import atexit
import fcntl
import ipaddress
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "munged"]
HOSTS = Path("/etc/hosts")
MARKER = "# bigtrain-test-cluster"
POLICY_RC = Path("/usr/sbin/policy-rc.d")
_counter = itertools.count(1)
_live: set[SlurmCluster] = set()  # started and not yet stopped (stopped on SIGTERM/SIGHUP too)


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
        # The packages' postinst would start munge/slurmctld/slurmd as system services where an
        # init system lets it; a policy-rc.d that says no keeps them stopped (Docker images have one).
        own_policy = not POLICY_RC.exists()
        if own_policy:
            POLICY_RC.write_text("#!/bin/sh\n# bigtrain tests: no services started by package installs\nexit 101\n")
            POLICY_RC.chmod(0o755)
        try:
            _run("apt-get", "update", "-qq", env=env)
            _run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES, env=env)
        finally:
            if own_policy:
                POLICY_RC.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _edit_hosts(drop) -> None:
    """Rewrite /etc/hosts in place (it may be a bind mount) without the lines ``drop`` selects."""
    if not HOSTS.exists():
        return
    lines = HOSTS.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not drop(line)]
    if kept != lines:
        HOSTS.write_text("".join(kept))


def _drop_stale_hosts_lines() -> None:
    """Lines left by a test process that was killed (SIGKILL: no atexit, no signal handler)."""
    def stale(line: str) -> bool:
        m = re.search(MARKER + r" bt(\d+)c\d+$", line.rstrip())
        return bool(m) and not _pid_alive(int(m.group(1)))
    _edit_hosts(stale)


def _free_subnet() -> str:
    """A 10.x.y.0/24 that overlaps no route, address or nameserver of this machine."""
    text = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    text += subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    text += Path("/etc/resolv.conf").read_text() if Path("/etc/resolv.conf").exists() else ""
    used = []
    for addr, plen in re.findall(r"\b(\d+\.\d+\.\d+\.\d+)(/\d+)?", text):
        try:
            used.append(ipaddress.ip_network(addr + (plen or "/32"), strict=False))
        except ValueError:
            pass
    start = os.getpid()
    for k in range(50 * 250):
        n = (start + k) % (50 * 250)
        subnet = ipaddress.ip_network(f"10.{200 + n // 250}.{n % 250}.0/24")
        if not any(subnet.overlaps(u) for u in used):
            return str(subnet.network_address).rsplit(".", 1)[0]
    raise RuntimeError("no free 10.x.y.0/24 subnet for the emulated nodes")


def _on_signal(signum, frame) -> None:
    for cluster in list(_live):
        cluster.stop()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _on_signal)


class SlurmCluster:
    def __init__(self, nodes: int = 1, namespaces: bool = False, cpus_per_node: int = 2):
        self.nodes, self.namespaces, self.cpus = nodes, namespaces, cpus_per_node
        # Unique per cluster (one process may run two at once), short enough for interface names.
        self.tag = f"bt{os.getpid()}c{next(_counter)}"
        self.node_names = [f"{self.tag}n{i + 1}" for i in range(nodes)]
        self.dir: Path | None = None
        self.procs: list[subprocess.Popen] = []
        self.netns: list[str] = []
        self.links: list[str] = []
        self.hosts_marker = f"{MARKER} {self.tag}"
        self.env: dict[str, str] = {}
        self.job_env: dict[str, str] = {"GLOO_SOCKET_IFNAME": "eth0"} if namespaces else {}
        self._stopped = True

    # -- can this machine run it? ---------------------------------------------------------------
    @staticmethod
    def skip_reason(nodes: int = 1, namespaces: bool = False) -> str | None:
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
    def start(self, timeout: float = 60) -> SlurmCluster:
        ensure_installed()
        self._stopped = False
        atexit.register(self.stop)
        _live.add(self)
        _install_signal_handlers()
        _drop_stale_hosts_lines()
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
                    # Its own hostname (UTS) and resolv.conf (a private mount namespace; `ip netns exec`
                    # would do that too, but it remounts /sys and slurmd then fails on cgroups).
                    resolv = Path("/etc/netns") / self.netns[i] / "resolv.conf"
                    cmd = ["nsenter", f"--net=/var/run/netns/{self.netns[i]}", "unshare", "--uts", "--mount", "sh",
                           "-c", f"mount --bind {resolv} /etc/resolv.conf && hostname {name} && exec " + " ".join(cmd)]
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
                               f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={mdir / 'munged.pid'}",
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
        subnet = _free_subnet()
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
            # No nameserver: names come from /etc/hosts, and a reverse lookup cannot block.
            (etc / "resolv.conf").write_text("# bigtrain test node: no nameserver, names come from /etc/hosts\n")
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
        text = HOSTS.read_text() if HOSTS.exists() else ""
        with open(HOSTS, "a") as fh:
            if text and not text.endswith("\n"):
                fh.write("\n")
            fh.writelines(f"{addr} {name} {self.hosts_marker}\n" for addr, name in entries)

    def _write_conf(self, addrs: list[str]) -> Path:
        d = self.dir
        host = socket.gethostname()
        ctld = f"{host}({self.ctld_addr})" if self.namespaces else host
        lines = [
            "ClusterName=bigtrain-test",
            f"SlurmctldHost={ctld}",
            f"SlurmctldPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            "CredType=cred/munge",
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
        lines.append("SlurmdParameters=config_overrides")  # the node's CPUs are the ones configured here
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
                         for p in sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("munge/*.log"))
                         + sorted(self.dir.glob("*.stdout")))

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
        _edit_hosts(lambda line: line.rstrip().endswith(self.hosts_marker))
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        atexit.unregister(self.stop)
        _live.discard(self)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]
