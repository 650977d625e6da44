"""One run, one folder, one truth: a run folder is owned by one live run (a lock the kernel drops on
any death), ranks die with their launcher, deaths and start-up interrupts are one line, and
``simclr sync`` leaves a run that is still training, or was killed hard, as it is."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.runs import (
    PY,
    REPO,
    assert_one_line_error,
    checkpoint_run_id,
    simclr,
    start_training,
    tiny_overrides,
    wait_for_steps,
)
from trainer.config import TrackingConfig, load_config
from trainer.run.loop import train
from trainer.runtime.run_files import RunFolderGoneError, RunFolderInUseError, RunFolderLock, read_jsonl
from trainer.state import checkpoint as ckpt
from trainer.tracking import sync_offline


def ranks_of(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """The rank processes a ``simclr train --nproc K`` started, by rank."""
    found = {}
    for child in psutil.Process(launcher.pid).children():
        try:
            found[int(child.environ()["RANK"])] = child
        except (KeyError, psutil.Error):
            pass
    return found


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    """In another process the lock is held; the second taker is refused naming pid and host; a
    SIGKILL of the holder frees it at once (no stale lock)."""
    code = ("import sys, time\nfrom trainer.runtime.run_files import RunFolderLock\n"
            f"RunFolderLock({str(tmp_path)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([PY, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderInUseError, match=f"pid {holder.pid} on {socket.gethostname()}"):
            RunFolderLock(tmp_path).acquire()
        assert f"pid {holder.pid}" in RunFolderLock(tmp_path).held_elsewhere()
    finally:
        holder.kill()
        holder.wait()
    assert RunFolderLock(tmp_path).held_elsewhere() is None
    lock = RunFolderLock(tmp_path)
    lock.acquire()
    lock.release()


@pytest.mark.slow
def test_a_second_run_into_a_live_run_folder_is_refused_and_a_hard_kill_leaves_no_stale_lock(photo_data, tmp_path,
                                                                                              capsys):
    """Two ``simclr train`` into one folder interleaved their metrics (2,2,4,4) and MLflow runs;
    now the second gets one line naming the first's pid and host. After a SIGKILL of the first,
    the same command resumes (the kernel dropped the lock) and ``simclr sync`` meanwhile leaves
    the killed run RUNNING, so the resume still records the unclean exit."""
    run_dir = tmp_path / "run"
    first = start_training(photo_data, run_dir, "trainer", **{"checkpoint.every_steps": 2})
    wait_for_steps(run_dir, first, steps=2)
    over = tiny_overrides(photo_data / "train", run_dir, **{"train.epochs": 200, "checkpoint.every_steps": 2,
                                                            "train.log_every": 1})
    second = simclr("train", *over)
    assert_one_line_error(second, str(run_dir), f"pid {first.pid} on {socket.gethostname()}", "train.run_dir")
    steps = [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == sorted(set(steps)), steps  # one writer: no step twice

    # sync while it trains: the metrics go, the status stays RUNNING (in this process: the lock is the other's)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sync_offline(run_dir, TrackingConfig(), None)
    assert "is still training" in capsys.readouterr().out
    run_id = checkpoint_run_id(ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir)))
    assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING"

    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    sync_offline(run_dir, TrackingConfig(), None)  # a hard-killed run: left RUNNING, not FINISHED
    assert "ended without closing" in capsys.readouterr().out
    assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING"

    step = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))["step"]
    resumed = train(load_config(None, [*over, f"train.stop_after_steps={step + 2}"]))  # the lock was dropped
    assert resumed.run_id == run_id
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.tags["simclr.unclean_exits"] == "1" and run.info.status == "KILLED"  # stopped short: not FINISHED


@pytest.mark.slow
def test_killing_the_launcher_stops_its_ranks_with_a_checkpoint(photo_data, tmp_path):
    """``kill -KILL`` of ``simclr train --nproc 2`` left both ranks training alone (PPID 1) to the
    end; now the kernel tells them (PR_SET_PDEATHSIG) and they stop at a step boundary, checkpoint
    and close the MLflow run as KILLED; the lock is free for the rerun."""
    run_dir = tmp_path / "run"
    launcher = start_training(photo_data, run_dir, "launch", "train", "--nproc", "2", **{"train.stop_check_every": 2})
    wait_for_steps(run_dir, launcher, steps=2)
    ranks = ranks_of(launcher)
    assert sorted(ranks) == [0, 1]
    launcher.kill()  # the launcher alone, as kill -KILL PID does
    start = time.time()
    gone, alive = psutil.wait_procs(list(ranks.values()), timeout=60)
    assert not alive, "ranks outlived their launcher"
    elapsed = time.time() - start
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(checkpoint_run_id(state)).info.status == "KILLED"
    assert RunFolderLock(run_dir).held_elsewhere() is None
    launcher.communicate()
    print(f"[measured] launcher SIGKILLed: both ranks checkpointed (step {state['step']}), ended {elapsed:.1f}s later")


def test_ctrl_c_during_start_up_trains_nothing_and_starts_no_mlflow_run(tiny_config, capsys):
    """A stop asked for while the run's parts are built: one line, no step, no checkpoint, no
    MLflow run (it used to create one and train a step first)."""
    cfg = tiny_config()
    stop = threading.Event()
    stop.set()
    result = train(cfg, stop=stop)
    assert result.preempted and result.step == 0 and result.run_id is None
    assert "stopped during start-up, before the first step; nothing was trained" in capsys.readouterr().err
    assert ckpt.latest_checkpoint(cfg.train.run_dir) is None
    assert not (Path(cfg.train.run_dir) / "metrics.jsonl").exists()
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert experiment is None or not client.search_runs([experiment.experiment_id])


def test_ctrl_c_while_the_mlflow_run_is_created_trains_nothing_and_keeps_no_run(tiny_config, capsys, monkeypatch):
    """Ctrl-C while the MLflow run was being created still trained a step, wrote step_1.pt and left
    a KILLED run with no metrics; now nothing is trained and the new run is not kept."""
    from trainer.tracking import Tracker

    cfg, stop = tiny_config(), threading.Event()
    real_start = Tracker.start

    def start_then_interrupt(self, *args, **kwargs):
        run_id = real_start(self, *args, **kwargs)
        stop.set()  # what the SIGINT handler does
        return run_id

    monkeypatch.setattr(Tracker, "start", start_then_interrupt)
    result = train(cfg, stop=stop)
    assert result.preempted and result.step == 0 and result.run_id is None
    assert "before the first step; nothing was trained" in capsys.readouterr().err
    assert ckpt.latest_checkpoint(cfg.train.run_dir) is None
    run_dir = Path(cfg.train.run_dir)
    assert not any((run_dir / name).exists() for name in ("metrics.jsonl", "mlflow_run.json", "config.yaml"))
    client = MlflowClient(cfg.tracking.uri)
    assert not client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])


def test_ctrl_c_while_a_rank_imports_is_one_line(photo_data, tmp_path):
    """SIGINT while ``python -m trainer`` is still loading torch: one line and 130, no traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([PY, "-m", "trainer", *tiny_overrides(photo_data / "train", tmp_path / "run")], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "stopped during start-up" in err, err[-2000:]


@pytest.mark.parametrize("env, launched, grouped", [
    ({}, False, False),
    ({"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, False, False),  # leftovers
    ({"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, True, True),  # --nproc 1
    ({"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "x"}, False, True),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, False, True),
])
def test_one_rule_says_whether_a_group_is_made_and_where_a_signal_stops_the_run(env, launched, grouped, monkeypatch):
    """init_distributed and the stop warning ask the same rule: a launcher's one rank makes a 1-rank
    group (its ranks agree to stop every train.stop_check_every steps); a shell's leftover WORLD_SIZE=1
    does not (it stops at the next step boundary)."""
    from trainer.runtime.distributed import LAUNCHER_MARKS, makes_a_group

    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", *LAUNCHER_MARKS):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert makes_a_group(launched) is grouped


def test_a_stray_world_size_is_one_line_at_once(tiny_config, monkeypatch):
    """``WORLD_SIZE=2`` left in the shell: plain ``simclr train`` waited ``dist.timeout_s`` (600 s)
    for ranks that never come, then printed a traceback."""
    from trainer.runtime.dataclass_yaml import ConfigError

    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    start = time.time()
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 is set .* RANK, MASTER_ADDR, MASTER_PORT are not.*unset"):
        train(tiny_config())
    assert time.time() - start < 5


def test_all_four_rank_variables_left_in_the_shell_say_so_at_once_and_end_in_one_line(photo_data, tmp_path):
    """WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT all left set: a silent wait, then a 41-line
    DistStoreError. Now a line at once says what is waited for and how to unset it, and the end
    is one line naming the fix."""
    from trainer.runtime.distributed import LAUNCHER_MARKS, free_port

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_MARKS}
    env.update(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    over = tiny_overrides(photo_data / "train", tmp_path / "run", **{"dist.timeout_s": 3})
    proc = subprocess.run([PY, "-m", "launch", "train", *over], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert "(no launcher set them): waiting up to dist.timeout_s=3 s" in proc.stderr.splitlines()[0], proc.stderr
    assert_one_line_error(proc, "could not join a process group of WORLD_SIZE=2", "unset WORLD_SIZE RANK")


# ----------------------------------------------------------------------------------- what a resume checks


def flip_bytes_inside_a_tensor(path: Path) -> str:
    """XOR 64 bytes in the middle of the checkpoint's largest tensor, as a bad disk or copy would;
    returns that member's name."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[start:start + 64] = bytes(b ^ 0xFF for b in raw[start:start + 64])
    path.write_bytes(bytes(raw))
    return info.filename


def test_a_checkpoint_with_flipped_bytes_is_named_not_loaded(tiny_config, capsys):
    """64 flipped bytes inside a tensor loaded silently and the resume trained on weights up to
    2.2e4; the zip's CRCs name the damaged part, and a plain resume falls back to the previous one."""
    cfg = tiny_config(**{"train.stop_after_steps": 4, "tracking.enabled": "false"})
    train(cfg)
    newest, previous = ckpt.list_checkpoints(ckpt.checkpoint_dir(cfg.train.run_dir))[:2]
    member = flip_bytes_inside_a_tensor(newest)
    with pytest.raises(ckpt.CheckpointError, match=f"its part {member} fails its CRC check"):
        ckpt.load_checkpoint(newest)
    with pytest.raises(ckpt.CheckpointError, match="fails its CRC check"):
        ckpt.load_weights(newest)  # simclr eval and embed read through the same check
    path, state = ckpt.find_resume_checkpoint(cfg.train.run_dir, "auto")
    assert "fails its CRC check" in capsys.readouterr().err
    assert path == previous and state["step"] == 2


def test_a_copied_run_folder_starts_its_own_mlflow_run_naming_its_parent(tiny_config, tmp_path):
    """Two copies of one folder, both resumed, appended to one MLflow run (step 6 held two losses);
    now the copy gets a run of its own, tagged with the one it came from; the original continues its
    own run. The same holds for another folder's step_N.pt passed as checkpoint.resume."""
    import shutil

    original = tiny_config(**{"train.stop_after_steps": 2})
    first = train(original)
    copy_dir = tmp_path / "copy"
    shutil.copytree(original.train.run_dir, copy_dir)
    copied = train(tiny_config(**{"train.stop_after_steps": 4, "train.run_dir": str(copy_dir)}))
    again = train(tiny_config(**{"train.stop_after_steps": 4}))
    elsewhere = tmp_path / "elsewhere"
    step2 = ckpt.list_checkpoints(ckpt.checkpoint_dir(copy_dir))[-1]
    from_path = train(tiny_config(**{"train.stop_after_steps": 4, "train.run_dir": str(elsewhere),
                                     "checkpoint.resume": str(step2)}))
    client = MlflowClient(original.tracking.uri)
    assert again.run_id == first.run_id
    assert len({first.run_id, copied.run_id, from_path.run_id}) == 3
    for result, parent in ((copied, first.run_id), (from_path, first.run_id)):
        tags = client.get_run(result.run_id).data.tags
        assert tags["simclr.parent_run_id"] == parent and tags["simclr.resumed_from"], tags
    losses = client.get_metric_history(first.run_id, "train/loss")
    assert sorted(m.step for m in losses) == [2, 4]  # the original's own steps, once each
    assert checkpoint_run_id(ckpt.load_checkpoint(ckpt.latest_checkpoint(copy_dir))) == copied.run_id


def test_changed_hyper_parameters_are_refused_unless_allowed_then_recorded(tiny_config):
    """Another optim.lr on resume was silent: config.yaml overwritten, MLflow params kept the old
    value while the lr metric jumped. Now: refused naming the key; run settings pass; with
    checkpoint.allow_changes=true the change is an MLflow param at its step, config.yaml kept."""
    import yaml

    first = train(tiny_config(**{"train.stop_after_steps": 2}))
    with pytest.raises(ckpt.CheckpointError, match=r"optim.lr 0.5 -> 1.5.*checkpoint.allow_changes=true"):
        train(tiny_config(**{"train.stop_after_steps": 4, "optim.lr": 1.5}))
    with pytest.raises(ckpt.CheckpointError, match=r"model.proj_out_dim 16 -> 8 \(the weights would not load"):
        train(tiny_config(**{"train.stop_after_steps": 4, "model.proj_out_dim": 8, "checkpoint.allow_changes": "true"}))
    settings = train(tiny_config(**{"train.stop_after_steps": 4, "model.channels_last": "false",
                                    "model.compile": "false", "model.sync_bn": "false", "data.num_workers": 1}))
    changed = train(tiny_config(**{"train.stop_after_steps": 6, "model.channels_last": "false", "optim.lr": 1.5,
                                   "model.sync_bn": "false", "data.num_workers": 1,
                                   "checkpoint.allow_changes": "true"}))
    assert first.run_id == settings.run_id == changed.run_id
    run_dir = Path(changed.run_dir)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 0.5  # the original, kept
    assert yaml.safe_load((run_dir / "config.step_000000004.yaml").read_text())["optim"]["lr"] == 1.5
    params = MlflowClient(tiny_config().tracking.uri).get_run(first.run_id).data.params
    assert params["optim.lr"] == "0.5" and params["changed_at_step_4.optim.lr"] == "0.5 -> 1.5"
    assert params["changed_at_step_2.model.sync_bn"] == "True -> False"


def test_a_changed_view_group_is_named_by_its_key_not_dumped(tiny_config):
    """Round 7, F15: a changed view specification was refused with a 1,221-character dump of both
    lists. Now the key that changed (given in the same indexed form, F55)."""
    views = "[{count: 2, size: 16}, {count: 2, size: 8}]"
    train(tiny_config(**{"train.stop_after_steps": 2, "data.views": views}))
    with pytest.raises(ckpt.CheckpointError) as refused:
        train(tiny_config(**{"train.stop_after_steps": 4, "data.views": views, "data.views[1].count": 4}))
    said = str(refused.value)
    assert "but these settings changed: data.views[1].count 2 -> 4. Resume with" in said and len(said) < 400, said


def test_a_changed_dataset_is_named_at_resume(photo_data, tmp_path):
    """A class added under a resume was a 37-line RuntimeError (probe outputs); a shrunk dataset
    said 'already finished' (step 39/24) with no encoder. Now one line names the change; with
    checkpoint.allow_changes=true a new class trains on with a fresh online probe, and a step past
    the shortened schedule is refused."""
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(photo_data / "train", tree)

    def config(**over):
        from trainer.config import load_config

        return load_config(None, tiny_overrides(tree, tmp_path / "run", **over))

    first = train(config(**{"train.stop_after_steps": 6}))
    shutil.copytree(tree / sorted(os.listdir(tree))[0], tree / "zebra")
    with pytest.raises(ckpt.CheckpointError, match=r"data.root changed: classes added: 'zebra' \(10 -> 11 classes\)"):
        train(config(**{"train.stop_after_steps": 8}))
    grown = train(config(**{"train.stop_after_steps": 8, "checkpoint.allow_changes": "true"}))
    assert grown.step == 8 and grown.run_id == first.run_id
    # MLflow's Datasets: the first start's data and, after the allowed change, the new data as well
    inputs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(grown.run_id).inputs.dataset_inputs
    said = [(i.dataset.name, json.loads(i.dataset.profile)["num_samples"]) for i in inputs]
    assert said == [("tree", 80), ("tree", 88)], said
    assert all(i.tags[0].key == "mlflow.data.context" and i.tags[0].value == "training" for i in inputs)
    assert json.loads(inputs[0].dataset.source)["uri"] == str(tree)
    shutil.rmtree(tree / "zebra")
    for folder in tree.iterdir():  # 80 images -> 20: 10 steps an epoch -> 2, 4 steps in all
        for extra in sorted(folder.iterdir())[2:]:
            extra.unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"classes removed: 'zebra'.*20 images where the run started on 88"):
        train(config())
    with pytest.raises(ckpt.CheckpointError, match=r"at step 8, past the end of this run's schedule \(4 steps"):
        train(config(**{"checkpoint.allow_changes": "true"}))


@pytest.mark.parametrize("run_dir,needle", [("~", "shared or system folder"), ("/", "shared or system folder"),
                                            ("/etc", "shared or system folder"),
                                            ("DATA/sub/run", "lies inside data.root")])
def test_a_run_folder_of_its_own(photo_data, run_dir, needle):
    """train.run_dir=~ said 'expected a string, got None'; / and /etc passed; a run folder inside
    data.root turned its own curves.png into an 11th class."""
    from trainer.config import load_config
    from trainer.run.loop import preflight
    from trainer.runtime.dataclass_yaml import ConfigError

    run_dir = run_dir.replace("DATA", str(photo_data / "train"))
    with pytest.raises(ConfigError, match=needle):
        preflight(load_config(None, [f"train.run_dir={run_dir}", f"data.root={photo_data / 'train'}"]))


@pytest.mark.slow
def test_eval_with_a_stuck_rank_ends_after_its_timeout_in_one_line(tiny_config, photo_data, tmp_path):
    """``simclr eval --nproc 2`` with a stopped rank hung for a fixed 600 s, then printed a
    traceback; --timeout-s bounds it, and the line names the rank and the command to run again."""
    cfg = tiny_config(**{"tracking.enabled": "false", "train.epochs": 1})
    train(cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([PY, "-m", "launch", "eval", "--nproc", "2", "--timeout-s", "5", "--checkpoint",
                             str(Path(cfg.train.run_dir) / "encoder.pt"), "--train-data", str(photo_data / "train"),
                             "--val-data", str(photo_data / "val"), "--device", "cpu", "--workers", "0"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while len(ranks_of(proc)) < 2:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    os.kill(ranks_of(proc)[1].pid, signal.SIGSTOP)
    start = time.time()
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "Traceback" not in out, out[-3000:]
    (line,) = [x for x in out.splitlines() if x.startswith("[simclr] error: rank 1 ")]
    assert "stopped answering (stopped (SIGSTOP" in line and "gave up after --timeout-s" in line
    assert "Run it again with: simclr eval --nproc 2" in line and "--timeout-s 5" in line
    print(f"[measured] eval --nproc 2, rank 1 stopped: ended {time.time() - start:.1f}s later (--timeout-s 5)")


@pytest.mark.slow
def test_a_bug_in_one_rank_shows_its_own_traceback_once(photo_data, tmp_path):
    """Under --nproc 2 a rank's own exception is the cause: its traceback is printed (once), the
    other rank's collective error (a consequence) goes to failure.log, and the line names the rank."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import trainer.losses.nt_xent as loss\n"
        "    real, calls = loss.nt_xent, []\n"
        "    def failing(*args, **kwargs):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 3:\n"
        "            raise RuntimeError('boom in rank 1')\n"
        "        return real(*args, **kwargs)\n"
        "    loss.nt_xent = failing\n")
    run_dir = tmp_path / "run"
    proc = simclr("train", "--nproc", "2", *tiny_overrides(photo_data / "train", run_dir),
                  env_extra={"PYTHONPATH": f"{hook}:{REPO}"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("Traceback") == 1 and "RuntimeError: boom in rank 1" in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("[simclr] error: rank ")]
    assert line.startswith("[simclr] error: rank 1 failed (exit status 1)") and "Resume with:" in line
    assert "rank 0" in (run_dir / "failure.log").read_text()


def test_deleting_the_lock_file_lets_no_second_run_in(tmp_path):
    """The lock is on the folder itself too: with ``.simclr.lock`` deleted under a live holder a
    second taker is still refused; the holder's next check writes the file again, naming itself."""
    code = ("import sys\nfrom trainer.runtime.run_files import RunFolderLock\n"
            f"lock = RunFolderLock({str(tmp_path)!r})\nlock.acquire()\nprint('held', flush=True)\n"
            "sys.stdin.readline()\nlock.check()\nprint('checked', flush=True)\nsys.stdin.readline()\n")
    holder = subprocess.Popen([PY, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (tmp_path / ".simclr.lock").unlink()
        with pytest.raises(RunFolderInUseError, match="was deleted"):
            RunFolderLock(tmp_path).acquire()
        assert RunFolderLock(tmp_path).held_elsewhere()
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "checked"
        with pytest.raises(RunFolderInUseError, match=f"pid {holder.pid} on"):
            RunFolderLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunFolderLock(tmp_path)  # the kernel dropped both locks with the holder
    lock.acquire()
    lock.release()


def test_a_removed_run_folder_is_named_and_never_made_again(tmp_path):
    run_dir = tmp_path / "run"
    lock = RunFolderLock(run_dir)
    lock.acquire()
    try:
        lock.check()  # untouched: fine
        shutil.rmtree(run_dir)
        with pytest.raises(RunFolderGoneError, match="was removed while the run trained"):
            lock.check()
        assert not run_dir.exists()
    finally:
        lock.release()


@pytest.mark.slow
def test_a_run_folder_moved_while_training_stops_and_resumes_where_it_went(photo_data, tmp_path):
    """A renamed run folder split the run in two (the old path made again, later checkpoints there,
    steps logged twice on resume). Now the run stops at its next log step with one line naming the
    new place and its newest checkpoint, writes nothing where it was, and resumes there with every
    step logged once, in metrics.jsonl and in MLflow."""
    run_dir, moved = tmp_path / "run", tmp_path / "run_renamed"
    proc = start_training(photo_data, run_dir, "launch", "train", **{"checkpoint.every_steps": 2})
    wait_for_steps(run_dir, proc, steps=3)
    run_dir.rename(moved)
    start = time.time()
    out = proc.communicate(timeout=120)[0]
    print(f"[measured] run folder moved: the run ended {time.time() - start:.1f}s later, nothing written where it was")
    assert proc.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("simclr: error:")]
    assert len(errors) == 1 and f"was moved to {moved}" in errors[0] and f"train.run_dir={moved}" in errors[0], out
    assert "newest checkpoint is now" in errors[0] and "Traceback" not in out
    assert not run_dir.exists()  # nothing written where it was

    steps_before = [row["step"] for row in read_jsonl(moved / "metrics.jsonl")]
    newest = ckpt.load_checkpoint(ckpt.latest_checkpoint(moved))["step"]
    over = tiny_overrides(photo_data / "train", moved, **{"train.epochs": 200, "checkpoint.every_steps": 2,
                                                          "train.log_every": 1,
                                                          "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                                          "train.stop_after_steps": max(steps_before) + 2})
    result = train(load_config(None, over))
    steps = [row["step"] for row in read_jsonl(moved / "metrics.jsonl")]
    assert newest <= max(steps_before) and steps == sorted(set(steps)) and max(steps) == max(steps_before) + 2, steps
    history = [m.step for m in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(result.run_id,
                                                                                                       "train/loss")]
    assert sorted(history) == steps, history  # each step once


def test_a_run_file_that_links_out_of_the_folder_is_refused(tiny_config, tmp_path):
    """A ``metrics.jsonl`` that is a symbolic link out of the run folder was appended through."""
    from trainer.runtime.run_files import RunFileError

    cfg = tiny_config(**{"train.stop_after_steps": 2})
    train(cfg)
    metrics = Path(cfg.train.run_dir) / "metrics.jsonl"
    outside = tmp_path / "outside.txt"
    outside.write_text("mine\n")
    metrics.unlink()
    metrics.symlink_to(outside)
    with pytest.raises(RunFileError, match="metrics.jsonl is a symbolic link .*cp --remove-destination"):
        train(tiny_config(**{"train.stop_after_steps": 4}))
    assert outside.read_text() == "mine\n"


def test_a_folder_moved_between_the_check_and_the_write_is_said_as_moved(photo_data, tmp_path, monkeypatch):
    """The folder is checked at log steps and checkpoints, then written; moved in between (CI hit
    it), the write found no folder and the run ended on a FileNotFoundError, which then hit the
    run log again while the tracking closed. Now it is the same one line as a move seen by the check."""
    from trainer.run import loop

    run_dir, moved = tmp_path / "run", tmp_path / "moved"
    cfg = load_config(None, tiny_overrides(photo_data / "train", run_dir))
    checked = loop.check_run_folder

    def check_then_move(parts) -> None:
        checked(parts)
        if run_dir.exists():
            run_dir.rename(moved)  # right after the check: the write that follows finds no folder

    monkeypatch.setattr(loop, "check_run_folder", check_then_move)
    with pytest.raises(RunFolderGoneError, match=f"was moved to {moved} while the run trained"):
        train(cfg)
    assert not run_dir.exists()
    record = json.loads((moved / "mlflow_run.json").read_text())
    assert record["status"] == "RUNNING"  # the moved folder's record is not written from the old path
