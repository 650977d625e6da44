"""Start and stop a real one-node SLURM cluster on this machine (munge, MariaDB, slurmdbd, slurmctld,
slurmd) for the submitit tests. Needs root and Debian's packages
``slurmctld slurmd slurm-client slurmdbd munge mariadb-server`` (``.ci/run`` installs them).

Accounting (slurmdbd + MariaDB) is on because submitit reads job states through sacct; without it a
cancelled job's ``result()`` would wait forever. ``AuthInfo=cred_expire=10`` lets a requeued job
start again after ~20 s instead of ~140 s. Every daemon is stopped by its pid file at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "scontrol", "mariadbd")
CLUSTER = "simclrtest"
DB_PASS = "simclr-test"


def available() -> str | None:
    """None if a cluster can be started here, else why not."""
    if os.geteuid() != 0:
        return "the SLURM test cluster needs root"
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]
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


class LocalSlurm:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]  # NodeName must match the name slurmd runs under
        self.pids: dict[str, Path] = {}

    def start(self) -> LocalSlurm:
        r = self.root
        for d in ("state", "spool", "log", "db", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        self._munge()
        self._mariadb()
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
        cpus = 8  # more slots than cores (config_overrides), so a job array's tasks can run side by side
        (conf / "slurm.conf").write_text(f"""ClusterName={CLUSTER}
SlurmctldHost={self.host}
AuthType=auth/munge
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
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
NodeName={self.host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
        self.pids["slurmdbd"] = r / "run/slurmdbd.pid"
        _run(["slurmdbd"])
        _wait("slurmdbd", lambda: _run(["sacctmgr", "-n", "list", "cluster"]).returncode == 0)
        _run(["sacctmgr", "-i", "add", "cluster", CLUSTER], timeout=30) if CLUSTER not in _run(
            ["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"]).stdout else None
        self.pids["slurmctld"] = r / "run/slurmctld.pid"
        _run(["slurmctld"])
        _wait("slurmctld", lambda: _run(["scontrol", "ping"]).stdout.count("UP") > 0)
        self.pids["slurmd"] = r / "run/slurmd.pid"
        _run(["slurmd"])
        _wait("the node", lambda: "idle" in _run(["sinfo", "-h", "-o", "%T"]).stdout, timeout=90)
        return self

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
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            pid_file = self.pids.get(name)
            if not pid_file or not pid_file.exists():
                continue
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, 15)
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, 9)
            except (ValueError, ProcessLookupError, PermissionError):
                pass
