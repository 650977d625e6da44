"""Object storage benchmark: the same shard set read from an S3-compatible store and from local
disk, at the same batch, workers and backend, through ``simclr bench feed`` (its ``loader`` and
``e2e`` modes): images/s of each, their ratio, the store's retries and the most bytes a rank's
read-ahead held.

The store is moto's S3 server started here on the loopback address (``pip install -e '.[dev]'``),
or any store given with ``--bucket`` (its endpoint and credentials in the environment, as for
training). The loopback server measures our client side (request overhead, read-ahead, the
decoder fed from memory), not a real network's latency or bandwidth.

    python -m benchmarks.object_store                                 # the shipped photos, resized
    python -m benchmarks.object_store --data /data/imagenette/train --shard-size 500
    simclr bench store ...                                            # the same

Writes JSON (device, versions, commit) under benchmarks/results/ and prints a table.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class LoopbackS3Server:
    """moto's standalone S3 server in its own process on 127.0.0.1, checking every request's
    signature against one IAM user made at start (whose keys are in ``credentials``)."""

    POLICY = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'
    UNSIGNED_SETUP_CALLS = 3  # the user, its policy and its key are made before signatures are checked

    def __init__(self) -> None:
        from trainer.runtime.distributed import free_port

        self.port = free_port()
        moto = Path(sys.executable).parent / "moto_server"
        if not moto.exists():
            raise SystemExit("the loopback S3 server is moto's: pip install -e '.[dev]' (or give --bucket)")
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(self.UNSIGNED_SETUP_CALLS)}
        self.proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True, env=env)
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        iam = self.client("iam", {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"})
        iam.create_user(UserName="trainer")
        iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=self.POLICY)
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        self.credentials = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                            "AWS_DEFAULT_REGION": "us-east-1"}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, service: str, keys: dict[str, str]):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1", **keys)

    def make_bucket(self, name: str) -> str:
        keys = {"aws_access_key_id": self.credentials["AWS_ACCESS_KEY_ID"],
                "aws_secret_access_key": self.credentials["AWS_SECRET_ACCESS_KEY"]}
        self.client("s3", keys).create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="simclr bench store", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="the dataset to shard (any layout data.root accepts; default: the "
                   "photos shipped with scikit-image and scikit-learn, 10 x --per-class images of 96 px)")
    p.add_argument("--per-class", type=int, default=100, help="without --data: photos per class (10 classes)")
    p.add_argument("--bucket", default=None, help="an existing s3:// prefix to write into (default: a loopback "
                   "server started here)")
    p.add_argument("--shard-size", type=int, default=100, help="samples per shard (default 100)")
    p.add_argument("--batch", type=int, default=64, help="global batch (default 64)")
    p.add_argument("--workers", type=int, default=2, help="data.num_workers (default 2)")
    p.add_argument("--image-size", type=int, default=64, help="crop size (default 64)")
    p.add_argument("--backend", default="torchvision", choices=("torchvision", "dali"))
    p.add_argument("--steps", type=int, default=30, help="timed steps per mode (default 30)")
    p.add_argument("--read-ahead", type=int, default=2, help="data.read_ahead_shards (default 2)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/object_store_<device>.json)")
    return p.parse_args(argv)


def feed_rows(root: str, args: argparse.Namespace, out: Path) -> dict[str, dict]:
    """``simclr bench feed``'s rows (by mode) for ``root``, in this process (one rank)."""
    from benchmarks import feed

    result = feed.main(["--modes", "loader", "e2e", "--steps", str(args.steps), "--warmup", "3", "--out", str(out),
                        f"data.root={root}", f"data.backend={args.backend}", f"data.batch_size={args.batch}",
                        f"data.num_workers={args.workers}", f"data.image_size={args.image_size}",
                        f"data.read_ahead_shards={args.read_ahead}", "train.device=cpu", "precision=fp32",
                        "model.arch=timm/test_resnet", "model.cifar_stem=false", "train.epochs=1000"])
    return {row["mode"]: row for row in result["rows"]}


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.common import RESULTS, device_name, print_table, result_header, write_json
    from data_pipeline import open_source
    from data_pipeline.shards import make_shards
    from trainer.runtime.device import choose_device

    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="simclr_store_bench_"))
    data = args.data
    if data is None:
        from data_pipeline.sample_data import make_demo_dataset

        data = str(make_demo_dataset(work / "photos", size=96, train_per_class=args.per_class, val_per_class=1,
                                 seed=0)["train"])
    source = open_source(data)
    server, saved_env = None, dict(os.environ)
    if args.bucket is None:
        server = LoopbackS3Server()
        os.environ.update({**server.credentials, "AWS_ENDPOINT_URL": server.endpoint})
        bucket = server.make_bucket("bench")
    else:
        bucket = args.bucket.rstrip("/")
    try:
        local, remote = work / "shards", f"{bucket}/shards-{int(time.time())}"
        manifest = make_shards(source, local, args.shard_size)
        make_shards(source, remote, args.shard_size)
        shard_mb = max(entry["bytes"] for entry in manifest["shards"]) / 2**20
        rows = {"local": feed_rows(str(local), args, work / "local.json"),
                "s3": feed_rows(remote, args, work / "s3.json")}
    finally:
        if server is not None:
            server.stop()
            os.environ.clear()  # the caller's environment back, without the server's keys
            os.environ.update(saved_env)
    device = choose_device("cpu")
    table = []
    for mode in ("loader", "e2e"):
        here, there = rows["local"][mode], rows["s3"][mode]
        table.append({"mode": mode, "local_images_per_s": here["views_per_s"] / 2,
                      "s3_images_per_s": there["views_per_s"] / 2, "ratio": there["views_per_s"] / here["views_per_s"],
                      "s3_retries": there["store_retries"], "read_ahead_peak_mb": there["read_ahead_peak_mb"],
                      "read_ahead_bound_mb": (args.read_ahead + 2) * shard_mb})
    result = {**result_header("object_store", device_name(device)),
              "config": {"data": str(data), "images": len(source), "shards": len(manifest["shards"]),
                         "largest_shard_mb": shard_mb, "batch": args.batch, "workers": args.workers,
                         "image_size": args.image_size, "backend": args.backend, "steps": args.steps,
                         "read_ahead_shards": args.read_ahead,
                         "store": "moto_server on 127.0.0.1" if server is not None else "given bucket"},
              "rows": table}
    print_table(f"object storage vs local disk: {len(source)} images in {len(manifest['shards'])} shards, batch "
                f"{args.batch}, {args.workers} workers, {args.backend}, on {result['device']}",
                [("mode", "<8"), ("local img/s", ">12.1f"), ("s3 img/s", ">10.1f"), ("s3/local", ">9.2f"),
                 ("retries", ">8"), ("read-ahead MB", ">14.2f"), ("bound MB", ">9.2f")],
                [(r["mode"], r["local_images_per_s"], r["s3_images_per_s"], r["ratio"], r["s3_retries"],
                  r["read_ahead_peak_mb"], r["read_ahead_bound_mb"]) for r in table])
    print(f"wrote {write_json(result, args.out or RESULTS / f'object_store_{device.type}.json')}")
    return result


if __name__ == "__main__":
    from foundation.logs import configure

    configure()  # a script is an entry point: it sets up the console lines
    main()
