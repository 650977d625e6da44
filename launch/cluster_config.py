"""A cluster's YAML (``cluster_configs/*.yaml``): the SLURM partition, nodes, GPUs, time, requeues,
environment and setup lines of the jobs ``simclr submit`` makes; read once, each value checked,
anything that reaches a shell kept to one line."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from trainer.runtime.dataclass_yaml import ConfigError, build_dataclass, read_yaml_mapping


@dataclass
class ClusterConfig:
    partition: str = ""
    account: str = ""
    qos: str = ""
    nodes: int = 1
    gpus_per_node: int = 0  # 0: a CPU cluster, then tasks_per_node ranks per node
    tasks_per_node: int = 1  # used only when gpus_per_node is 0
    max_gpus: int = 0  # the most GPUs a job may ask for on this cluster (0: no limit)
    cpus_per_task: int = 8
    mem_gb: int = 0  # per node; 0: the cluster default
    time_min: int = 60
    constraint: str = ""
    exclusive: bool = False
    extra_sbatch: dict[str, str] = field(default_factory=dict)  # e.g. {reservation: big, gres-flags: enforce-binding}
    setup: list[str] = field(default_factory=list)  # module loads, venv activation
    env: dict[str, str] = field(default_factory=dict)
    # The network interface between nodes for gloo and NCCL (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME),
    # e.g. ib0 or eth1; '' lets each library choose, which fails where the hostname resolves to an
    # address the other nodes cannot reach (a loopback entry, a management network).
    network_interface: str = ""
    log_dir: str = "slurm_logs"
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit
    max_requeues: int = 3
    array_parallelism: int = 8  # concurrent tasks of a sweep's job array


def load_cluster_config(path: str | Path) -> ClusterConfig:
    """A cluster config: a path, or the name of a shipped example (``single_node``, ``two_node``, ...)."""
    from trainer.runtime.recipes import find_recipe

    p = find_recipe(path, "cluster_configs")
    data = read_yaml_mapping(p, "cluster config", "see cluster_configs/ for examples")
    try:
        cluster = build_dataclass(ClusterConfig, data, "cluster.")
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    if not cluster.partition:
        raise ConfigError(f"{p}: cluster.partition is missing; name the SLURM partition (sinfo lists them)")
    for key in ("nodes", "tasks_per_node", "cpus_per_task", "time_min", "array_parallelism"):
        if getattr(cluster, key) <= 0:
            raise ConfigError(f"{p}: cluster.{key}={getattr(cluster, key)} must be a positive integer")
    for key in ("gpus_per_node", "max_gpus", "mem_gb", "signal_delay_s", "max_requeues"):
        if getattr(cluster, key) < 0:
            raise ConfigError(f"{p}: cluster.{key}={getattr(cluster, key)} must be >= 0")
    if cluster.signal_delay_s + 60 >= cluster.time_min * 60:
        raise ConfigError(f"{p}: cluster.signal_delay_s={cluster.signal_delay_s} leaves no time to train within "
                          f"cluster.time_min={cluster.time_min} ({cluster.time_min * 60} s): SLURM would warn the job "
                          "of its end before it trains a minute; raise time_min or lower signal_delay_s")
    check_single_lines(cluster, p)
    total = cluster.nodes * cluster.gpus_per_node
    if cluster.max_gpus and total > cluster.max_gpus:
        raise ConfigError(f"{p}: {cluster.nodes} nodes x {cluster.gpus_per_node} GPUs = {total} GPUs, more than "
                          f"cluster.max_gpus={cluster.max_gpus} allows; lower nodes or gpus_per_node")
    return cluster


def check_single_lines(cluster: ClusterConfig, path: Path) -> None:
    """Every string that goes into the sbatch script is one line: a line break in a partition name
    would add an #SBATCH line of its own (or a command) to the job."""
    strings = [(f"cluster.{f.name}", getattr(cluster, f.name)) for f in fields(cluster)
               if isinstance(getattr(cluster, f.name), str)]
    for section in ("extra_sbatch", "env"):
        strings += [(f"cluster.{section} key", k) for k in getattr(cluster, section)]
        strings += [(f"cluster.{section}.{k}", str(v)) for k, v in getattr(cluster, section).items()]
    strings += [(f"cluster.setup[{i}]", line) for i, line in enumerate(cluster.setup)]
    for key, value in strings:
        check_one_line(key, value, f"{path}: ")
    for name in cluster.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"{path}: cluster.env key {name!r} is not a variable name (letters, digits and _, not "
                              "starting with a digit); rename it")


def check_one_line(key: str, value: str, where: str = "") -> None:
    """A string bound for the sbatch script holds no line break or control character (it would add
    a line of its own: an #SBATCH option, or a command)."""
    if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in value):
        raise ConfigError(f"{where}{key}={value!r} holds a line break or control character, which would add a "
                          "line of its own to the sbatch script; give it on one line")


def ranks_per_node(cluster: ClusterConfig) -> int:
    return cluster.gpus_per_node or cluster.tasks_per_node
