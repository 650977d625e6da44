"""Start and stop a real SLURM cluster on this machine (munge, MariaDB, slurmdbd, slurmctld, slurmd)
for the submitit tests. Needs root and Debian's packages
``slurmctld slurmd slurm-client slurmdbd munge mariadb-server`` (``.ci/run`` installs them).

One node: slurmd beside slurmctld. Two nodes (``LocalSlurm(root, nodes=2)``): each slurmd runs in a
network namespace of its own (``TestNetwork``: a bridge and veth pairs on a private /24 that only
this suite uses), started with ``nsenter --net`` (``ip netns exec`` remounts /sys, and slurmd then
finds no cgroup file system); munge's socket is shared through the file system, and the node names
resolve through /etc/hosts. All of it is removed again on stop, also when a test failed.

Accounting (slurmdbd + MariaDB) is on because submitit reads job states through sacct; without it a
cancelled job's ``result()`` would wait forever. ``AuthInfo=cred_expire=10`` lets a requeued job
start again after ~20 s instead of ~140 s. Every daemon is stopped by its pid file at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "scontrol", "mariadbd")
CLUSTER = "simclrtest"
DB_PASS = "simclr-test"


def available(nodes: int = 1) -> str | None:
    """None if a cluster of ``nodes`` can be started here, else why not."""
    if os.geteuid() != 0:
        return "the SLURM test cluster needs root"
    needed = BINARIES + (("ip", "nsenter") if nodes > 1 else ())
    missing = [b for b in needed if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        return f"SLURM/munge/MariaDB not installed (missing {', '.join(missing)})"
    return None


def _run(cmd: list[str] | str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, shell=isinstance(cmd, str), **kw)
    if proc.returncode:
        output = proc.stderr[-2000:] + proc.stdout[-1000:]
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, output)
    return proc


def _wait(what: str, check, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except (subprocess.CalledProcessError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f}s (logs in the cluster's log/ folder)")


class TestNetwork:
    """``count`` hosts on one machine: network namespaces ``simclr-nodeK`` with interface ``simclr0``
    at 10.77.0.1K, joined by the bridge ``simclrbr0`` (10.77.0.1, where slurmctld listens)."""

    BRIDGE, PREFIX, INTERFACE, SUBNET = "simclrbr0", "simclr-node", "simclr0", "10.77.0"
    HOSTS_MARK = "# simclr-scale test network"

    def __init__(self, count: int) -> None:
        self.names = [f"node{i}" for i in range(1, count + 1)]

    def address(self, name: str) -> str:
        return f"{self.SUBNET}.1{name[len('node'):]}"

    @property
    def controller_address(self) -> str:
        return f"{self.SUBNET}.1"

    def namespace(self, name: str) -> str:
        return self.PREFIX + name[len("node"):]

    def nsenter(self, name: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.namespace(name)}"]

    def up(self) -> TestNetwork:
        self.down()  # leftovers of a run that was killed
        _run(["ip", "link", "add", self.BRIDGE, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.controller_address}/24", "dev", self.BRIDGE])
        _run(["ip", "link", "set", self.BRIDGE, "up"])
        for name in self.names:
            ns, host_end = self.namespace(name), f"simclr-h{name[len('node'):]}"
            _run(["ip", "netns", "add", ns])
            _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", self.INTERFACE, "netns", ns])
            _run(["ip", "link", "set", host_end, "master", self.BRIDGE])
            _run(["ip", "link", "set", host_end, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.address(name)}/24", "dev", self.INTERFACE])
            _run(["ip", "-n", ns, "link", "set", self.INTERFACE, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        hosts = Path("/etc/hosts")
        lines = [f"{self.address(n)} {n} {self.HOSTS_MARK}" for n in self.names]
        hosts.write_text(hosts.read_text().rstrip("\n") + "\n" + "\n".join(lines) + "\n")
        return self

    def kill_node(self, name: str) -> None:
        """Everything running on ``name`` dies at once (its slurmd and the job's task), as in a power loss."""
        pids = subprocess.run(["ip", "netns", "pids", self.namespace(name)], capture_output=True, text=True).stdout
        for pid in pids.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def down(self) -> None:
        for name in self.names:
            self.kill_node(name)
            subprocess.run(["ip", "netns", "delete", self.namespace(name)], capture_output=True)
            subprocess.run(["ip", "link", "delete", f"simclr-h{name[len('node'):]}"], capture_output=True)
        subprocess.run(["ip", "link", "delete", self.BRIDGE], capture_output=True)
        hosts = Path("/etc/hosts")
        kept = [line for line in hosts.read_text().splitlines() if self.HOSTS_MARK not in line]
        hosts.write_text("\n".join(kept) + "\n")


class LocalSlurm:
    def __init__(self, root: Path, nodes: int = 1) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]  # NodeName must match the name slurmd runs under
        self.pids: dict[str, Path] = {}
        self.network = TestNetwork(nodes) if nodes > 1 else None

    def start(self) -> LocalSlurm:
        """munged, MariaDB, slurmdbd, slurmctld and the nodes' slurmd, each waited for."""
        for d in ("state", "spool", "log", "db", "run"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self._munge()
        self._mariadb()
        if self.network:
            self.network.up()
        self._write_slurmdbd_conf()
        self._write_slurm_conf()
        self._start_daemons()
        return self

    def _write_slurmdbd_conf(self) -> None:
        r = self.root
        conf = Path("/etc/slurm")
        conf.mkdir(exist_ok=True)
        dbd = conf / "slurmdbd.conf"
        dbd.write_text(f"""AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile={r}/run/slurmdbd.pid
LogFile={r}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3307
StorageUser=slurm
StoragePass={DB_PASS}
StorageLoc=slurm_acct_db
""")
        dbd.chmod(0o600)

    def _write_slurm_conf(self) -> None:
        r = self.root
        cpus = 8  # more slots than cores (config_overrides), so a job array's tasks can run side by side
        controller, nodes = self.host, f"""NodeName={self.host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"""
        if self.network:  # one CPU per node, each at its own address; slurmctld on the bridge
            controller = f"{self.host}({self.network.controller_address})"
            nodes = "\n".join(f"NodeName={n} NodeAddr={self.network.address(n)} CPUs=1 State=UNKNOWN"
                              for n in self.network.names)
            nodes += f"\nPartitionName=debug Nodes={','.join(self.network.names)} Default=YES MaxTime=INFINITE State=UP"
        Path("/etc/slurm/slurm.conf").write_text(f"""ClusterName={CLUSTER}
SlurmctldHost={controller}
AuthType=auth/munge
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
MinJobAge=600
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
{nodes}
""")

    def _start_daemons(self) -> None:
        r = self.root
        self.pids["slurmdbd"] = r / "run/slurmdbd.pid"
        _run(["slurmdbd"])
        _wait("slurmdbd", lambda: _run(["sacctmgr", "-n", "list", "cluster"]).returncode == 0)
        _run(["sacctmgr", "-i", "add", "cluster", CLUSTER], timeout=30) if CLUSTER not in _run(
            ["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"]).stdout else None
        self.pids["slurmctld"] = r / "run/slurmctld.pid"
        _run(["slurmctld"])
        _wait("slurmctld", lambda: _run(["scontrol", "ping"]).stdout.count("UP") > 0)
        if self.network:
            for name in self.network.names:
                self.pids[f"slurmd-{name}"] = r / f"run/slurmd-{name}.pid"
                _run([*self.network.nsenter(name), "slurmd", "-N", name])
        else:
            self.pids["slurmd"] = r / f"run/slurmd-{self.host}.pid"
            _run(["slurmd"])
        count = len(self.network.names) if self.network else 1
        _wait("the nodes", lambda: _run(["sinfo", "-h", "-N", "-o", "%T"]).stdout.split().count("idle") == count,
              timeout=90)

    def _munge(self) -> None:
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            _run(["mungekey", "--create", "--keyfile", str(key)]) if shutil.which("mungekey") else \
                key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        self.pids["munged"] = Path("/run/munge/munged.pid")
        if not self._alive("munged"):
            _run(["runuser", "-u", "munge", "--", "munged"])
        _wait("munged", lambda: _run("munge -n | unmunge").returncode == 0)

    def _mariadb(self) -> None:
        data = self.root / "db"
        sock = self.root / "run/mysqld.sock"
        shutil.chown(data, "mysql", "mysql")
        shutil.chown(self.root / "run", "mysql", "mysql")
        if not (data / "mysql").exists():
            _run(["mariadb-install-db", "--user=mysql", f"--datadir={data}",
                  "--auth-root-authentication-method=normal"], timeout=120)
        self.pids["mariadbd"] = self.root / "run/mysqld.pid"
        subprocess.Popen(["mariadbd", "--user=mysql", f"--datadir={data}", f"--socket={sock}",
                          f"--pid-file={self.pids['mariadbd']}", "--port=3307", "--bind-address=127.0.0.1",
                          "--skip-name-resolve", f"--log-error={self.root}/log/mariadb.log"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        sql = (f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{DB_PASS}';"
               f"CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '{DB_PASS}';"
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
               "FLUSH PRIVILEGES;")
        _wait("mariadb", lambda: _run(["mariadb", f"--socket={sock}", "-uroot", "-e", sql]).returncode == 0, 90)

    def _alive(self, name: str) -> bool:
        pid_file = self.pids.get(name)
        if not pid_file or not pid_file.exists():
            return False
        try:
            os.kill(int(pid_file.read_text().strip()), 0)
            return True
        except (ValueError, ProcessLookupError):
            return False

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], capture_output=True)
        if self.network:
            self.network.down()  # the nodes' slurmd and tasks go with their namespaces
        # The cluster is thrown away with its folder: every daemon gets SIGTERM at once and a short
        # grace, then SIGKILL (one by one, each given 10 s, the teardown took ~18 s of the suite's time).
        pids = []
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            pid_file = self.pids.get(name)
            try:
                pids.append(int(pid_file.read_text().strip()))
                os.kill(pids[-1], signal.SIGTERM)
            except (AttributeError, OSError, ValueError):
                pass
        deadline = time.time() + 3
        while pids and time.time() < deadline:
            pids = [pid for pid in pids if _alive_pid(pid)]
            time.sleep(0.1)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        deadline = time.time() + 10  # gone, so that the next cluster finds its ports free
        while any(_alive_pid(pid) for pid in pids) and time.time() < deadline:
            time.sleep(0.1)


def _alive_pid(pid: int) -> bool:
    """Whether ``pid`` still runs; a zombie (mariadbd is our own child) is reaped and counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z":
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return True


@contextlib.contextmanager
def running_cluster(nodes: int = 1) -> Iterator[LocalSlurm]:
    """A started cluster for a test module; skips where none can run here, except where
    SIMCLR_REQUIRE_SLURM=1 (as .ci/run sets): there a missing cluster fails instead."""
    import pytest

    why = available(nodes)
    if why:
        if os.environ.get("SIMCLR_REQUIRE_SLURM") == "1":
            pytest.fail(f"SIMCLR_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="simclr-slurm-"))  # not under pytest's 0700 tmp: mysql must enter it
    root.chmod(0o755)
    cluster = LocalSlurm(root, nodes)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
