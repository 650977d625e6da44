"""Training straight from object storage: a real S3-compatible server (moto's, in its own process)
on the loopback address, behind a proxy that the tests take down and bring back
(``tests/helpers/s3_server.py``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import open_source
from data_pipeline.object_store import ObjectStore, RemoteSettings
from data_pipeline.shards import make_shards
from data_pipeline.sources import DataError
from tests.helpers.runs import PY, REPO, assert_bitwise_equal, final_state, tiny_overrides

SHARD_SIZE = 4  # 20 shards of the 80 photos: a rank fetches a shard about every step, so an outage meets fetches


@pytest.fixture(scope="module")
def s3(photo_data, tmp_path_factory):
    """The server, with the photos written to ``s3://data/photos`` by ``simclr make-shards --out``
    (and the same shards in a local folder, to compare with)."""
    from tests.helpers.s3_server import S3Server

    server = S3Server()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)  # this process's clients too
    try:
        bucket = server.make_bucket("data")
        url = f"{bucket}/photos"
        made = subprocess.run([PY, "-m", "launch", "make-shards", str(photo_data / "train"), "--out", url,
                               "--shard-size", str(SHARD_SIZE)], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert made.returncode == 0, made.stdout + made.stderr
        assert f"into {url}" in made.stdout
        local = tmp_path_factory.mktemp("local_shards") / "photos"
        make_shards(open_source(photo_data / "train"), local, SHARD_SIZE)
        yield {"server": server, "url": url, "bucket": bucket, "local": local, "photos": photo_data}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def simclr_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def metric_values(run_dir: Path, name: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row[name] for row in rows if name in row]


def logged_step(run_dir: Path) -> int:
    """The run's newest logged step (0 before the first)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except ValueError:  # a line being written
        return 0


def test_the_shards_in_the_store_are_the_local_shards_and_read_the_same(s3):
    remote, local = open_source(s3["url"]), open_source(s3["local"])
    assert len(remote) == len(local) == 80 and remote.classes == local.classes
    assert remote.shards == local.shards and (remote.offsets == local.offsets).all()
    assert (remote.labels == local.labels).all()
    assert remote.read_encoded(7) == local.read_encoded(7)
    assert remote.sample_name(0).startswith(f"{s3['url']}/shard-000000.tar:")
    store = ObjectStore(s3["url"])
    sizes = store.sizes()
    assert sizes["manifest.json"] and len([n for n in sizes if n.endswith(".tar")]) == 20


def test_the_read_ahead_yields_every_sample_once_in_order_through_an_outage(s3):
    """The store goes away for two seconds while a rank's epoch is read: every sample of the
    order comes once, in order, with its own bytes; the retries are counted."""
    remote = open_source(s3["url"], remote=RemoteSettings(timeout_s=30, read_ahead_shards=1))
    local = open_source(s3["local"])
    order = remote.epoch_order(rank=1, world_size=2, seed=3, epoch=0)
    ahead = remote.read_ahead(order)
    assert len(ahead) == len(order) == 40
    got = []
    for k, data in enumerate(ahead):
        got.append(data)
        if k == 5:
            s3["server"].proxy.down()
            time.sleep(2)
            s3["server"].proxy.up()
    assert got == [local.read_encoded(int(i)) for i in order]
    assert remote.store_retries > 0
    print(f"[measured] a 2 s outage cost {remote.store_retries} retries")


def test_two_ranks_train_from_s3_through_an_outage_and_a_sigterm_as_from_local_shards(s3, tmp_path):
    """``simclr train --nproc 2`` from ``s3://``: the store goes away for 3 s mid-epoch and comes
    back (the run goes on, the retries counted in its metrics), then SIGTERM mid-epoch and a resume.
    Its weights equal those of the same run from the same shards on local disk, uninterrupted:
    no sample was lost or repeated, and the resume started at the exact sample."""
    common = {"train.epochs": 4, "checkpoint.every_steps": 3, "train.log_every": 1, "tracking.enabled": "false",
              "train.stop_check_every": 1,
              "data.read_ahead_shards": 1, "data.store_timeout_s": 60}
    ref = subprocess.run([PY, "-m", "launch", "train", "--nproc", "2",
                          *tiny_overrides(s3["local"], tmp_path / "ref", **common)],
                         cwd=REPO, env=simclr_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]

    run_dir = tmp_path / "s3run"
    over = tiny_overrides(s3["url"], run_dir, **common)
    proc = subprocess.Popen([PY, "-m", "launch", "train", "--nproc", "2", *over], cwd=REPO, env=simclr_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while logged_step(run_dir) < 4:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.1)
        s3["server"].proxy.down()
        time.sleep(3)
        s3["server"].proxy.up()
        seen = logged_step(run_dir)
        # going on after the outage, then stopped early in an epoch (the signal is taken at the next step)
        while not (logged_step(run_dir) >= seen + 3 and logged_step(run_dir) % 10 in (1, 2, 3)):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stopped = final_state(run_dir)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert 0 < stopped["step"] < 40 and stopped["step"] % 10, stopped["step"]  # mid-epoch
    assert max(metric_values(run_dir, "data/store_retries")) > 0
    resumed = subprocess.run([PY, "-m", "launch", "train", "--nproc", "2", *over], cwd=REPO, env=simclr_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_bitwise_equal(final_state(run_dir), final_state(tmp_path / "ref"))
    print(f"[measured] SIGTERM at step {stopped['step']}; retries during the 3 s outage: "
          f"{max(metric_values(run_dir, 'data/store_retries')):.0f}")


def test_two_ranks_train_from_s3_with_dali(s3, tmp_path):
    pytest.importorskip("nvidia.dali")
    run_dir = tmp_path / "run"
    proc = subprocess.run([PY, "-m", "launch", "train", "--nproc", "2",
                           *tiny_overrides(s3["url"], run_dir, **{"data.backend": "dali", "data.num_workers": 1,
                                                                  "train.epochs": 2, "tracking.enabled": "false"})],
                          cwd=REPO, env=simclr_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DALI" in proc.stdout or "dali backend" in proc.stdout
    assert final_state(run_dir)["step"] == 20
    assert metric_values(run_dir, "data/store_retries")[-1] == 0


def test_a_store_gone_for_longer_than_the_timeout_ends_the_run_in_one_line_with_a_checkpoint(s3, tmp_path):
    run_dir = tmp_path / "run"
    over = tiny_overrides(s3["url"], run_dir, **{"train.epochs": 20, "checkpoint.every_steps": 2,
                                                 "train.log_every": 1, "tracking.enabled": "false",
                                                 "data.read_ahead_shards": 1, "data.store_timeout_s": 3})
    proc = subprocess.Popen([PY, "-m", "launch", "train", *over], cwd=REPO, env=simclr_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    try:
        while logged_step(run_dir) < 3:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.1)
        s3["server"].proxy.down()
        out = proc.communicate(timeout=60)[0]
    finally:
        s3["server"].proxy.up()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    (line,) = [x for x in out.splitlines() if "did not answer" in x]
    assert "data.store_timeout_s=3" in line and "resume" in line
    assert final_state(run_dir)["step"] >= 2  # the checkpoints are intact and load


def test_a_missing_shard_is_named_and_left_out_only_with_skip_corrupt(s3, tmp_path):
    url = f"{s3['bucket']}/missing"
    make_shards(open_source(s3["photos"] / "train"), url, 20)
    store = ObjectStore(url)
    store.fs.rm_file(f"{store.root}/shard-000002.tar")
    with pytest.raises(DataError, match=r"shard s3://data/missing/shard-000002.tar listed in .* is missing"):
        open_source(url)
    proc = subprocess.run([PY, "-m", "launch", "train", *tiny_overrides(url, tmp_path / "run", **{
        "data.skip_corrupt": "true", "train.epochs": 1, "tracking.enabled": "false"})],
        cwd=REPO, env=simclr_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "shard-000002.tar" in proc.stderr and "left out" in proc.stderr
    assert "60 images" in proc.stdout
    assert metric_values(tmp_path / "run", "data/skipped_corrupt_images")[-1] == 20


def test_wrong_credentials_are_one_line_and_no_secret_is_shown(s3, tmp_path):
    secret = "wrong-secret-value-1234"
    proc = subprocess.run([PY, "-m", "launch", "train", *tiny_overrides(s3["url"], tmp_path / "run",
                                                                          **{"tracking.enabled": "false"})],
                          cwd=REPO, env=simclr_env(AWS_SECRET_ACCESS_KEY=secret), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if "refused" in x]
    assert "AWS_SECRET_ACCESS_KEY" in line and secret not in proc.stdout + proc.stderr


def test_a_dry_run_asks_the_store_what_the_run_would(s3, tmp_path):
    """``simclr train --dry-run`` said "config OK" for any s3:// URL; it now lists the set once, so a
    wrong prefix or wrong credentials are the run's own one line, before a job is queued."""
    def dry(url: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "launch", "train", "--dry-run",
                               *tiny_overrides(url, tmp_path / "run", **{"tracking.enabled": "false"})],
                              cwd=REPO, env=simclr_env(**env), capture_output=True, text=True, timeout=300)

    ok = dry(s3["url"])
    assert ok.returncode == 0 and "config OK" in ok.stderr + ok.stdout, ok.stderr[-2000:]
    missing = dry(f"{s3['bucket']}/no_such_set")
    assert missing.returncode == 2 and "holds no manifest.json" in missing.stderr, missing.stderr[-2000:]
    secret = "wrong-secret-value-5678"
    refused = dry(s3["url"], AWS_SECRET_ACCESS_KEY=secret)
    assert refused.returncode == 2 and "refused to list" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in missing.stderr + refused.stderr and secret not in refused.stdout + refused.stderr


def test_a_url_with_a_password_is_refused_without_showing_it():
    with pytest.raises(DataError, match=r"https://\*\*\*@example.com/set carries credentials") as info:
        ObjectStore("https://me:hunter2@example.com/set")
    assert "hunter2" not in str(info.value)


def test_without_the_extra_the_error_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)
    with pytest.raises(DataError, match=r"pip install 'simclr-scale\[s3\]'"):
        ObjectStore("s3://bucket/prefix")


def test_a_set_whose_manifest_was_never_written_is_not_read(s3):
    """make-shards writes the manifest last: a run that died before it leaves a set no one reads."""
    url = f"{s3['bucket']}/unfinished"
    source = open_source(s3["photos"] / "train")
    real = source.read_encoded

    def dies_midway(index: int) -> bytes:
        if index == int(np.random.default_rng(0).permutation(len(source))[30]):
            raise OSError("the writer died")
        return real(index)

    source.read_encoded = dies_midway
    with pytest.raises(OSError):
        make_shards(source, url, 10)
    assert ObjectStore(url).sizes()  # some shards were written
    with pytest.raises(DataError, match="holds no manifest.json"):
        open_source(url)
    with pytest.raises(DataError, match="is not empty"):
        make_shards(open_source(s3["photos"] / "train"), url, 10)


def test_the_shard_cache_serves_a_store_that_is_gone_and_keeps_under_its_cap(s3, tmp_path):
    """With data.store_cache, a shard read once comes from the local folder the next time (the
    store may be away); the folder never holds more than data.store_cache_gb."""
    shard_bytes = max(e["bytes"] for e in json.loads(ObjectStore(s3["url"]).read_text("manifest.json"))["shards"])
    cap_gb = 3.5 * shard_bytes / 2**30  # room for three shards
    remote = open_source(s3["url"], remote=RemoteSettings(timeout_s=2, cache=str(tmp_path / "cache"),
                                                          cache_gb=cap_gb))
    order = np.arange(8)  # the first two shards
    first = list(remote.read_ahead(order))
    s3["server"].proxy.down()
    try:
        assert list(remote.read_ahead(order)) == first  # from the cache: no request reached the store
        with pytest.raises(DataError, match="did not answer"):
            list(remote.read_ahead(np.arange(8, 12)))  # not cached: the store is needed
    finally:
        s3["server"].proxy.up()
    list(remote.read_ahead(np.arange(len(remote))))  # every shard once: the oldest leave
    kept = list((tmp_path / "cache").glob("*.tar"))
    assert 0 < len(kept) <= 3 and sum(p.stat().st_size for p in kept) <= cap_gb * 2**30


def test_the_store_benchmark_compares_with_local_disk_and_measures_the_read_ahead(tmp_path):
    from benchmarks.object_store import main

    out = tmp_path / "store.json"
    result = main(["--per-class", "8", "--steps", "3", "--batch", "16", "--workers", "0", "--image-size", "16",
                   "--shard-size", "20",
                   "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["git_commit"] == result["git_commit"] and saved["device"]
    rows = {r["mode"]: r for r in saved["rows"]}
    assert set(rows) == {"loader", "e2e"}
    for r in rows.values():
        assert r["local_images_per_s"] > 0 and r["s3_images_per_s"] > 0 and r["ratio"] > 0
        assert 0 < r["read_ahead_peak_mb"] <= r["read_ahead_bound_mb"]
