"""MLflow stores: which URIs MLflow opens, a client on one (failing fast over HTTP), the
experiment, a store's failure named in words, and where a person opens a run."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from foundation.errors import UserError
from foundation.logs import get_logger
from trainer.runtime.credentials import usable_uri
from trainer.runtime.dataclass_yaml import ConfigError
from trainer.tracking.config import TrackingConfig

tracking_log = get_logger("tracking")


class TrackingError(UserError, RuntimeError):
    """A tracking problem the user must act on (a run folder without metrics, a store that does not
    answer when replaying); the CLI prints it as one line with status 2."""


def tracking_scheme(uri: str) -> str:
    """The scheme of an MLflow tracking URI ('' for the default store or a plain local path)."""
    return uri.split(":", 1)[0].split("+", 1)[0].lower() if "://" in uri or uri.startswith("file:") else ""


def known_tracking_schemes() -> set[str]:
    """MLflow's built-in tracking stores and those plugins register (entry points)."""
    from importlib.metadata import entry_points

    plugins = {ep.name for ep in entry_points(group="mlflow.tracking_store")}
    return {"", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc",
            "uc", *plugins}


def check_store_uri(uri: str) -> None:
    """A tracking URI MLflow can open: a known scheme, and no file store unless MLflow is told to
    allow one (MLflow 3 refuses them: every run would go untracked)."""
    scheme = tracking_scheme(uri)
    if scheme not in known_tracking_schemes():
        raise ConfigError(f"tracking.uri: {uri!r} is out of range; MLflow does not know the scheme {scheme!r}; use "
                          "http(s)://host:port, sqlite:///path.db, a database URI (postgresql://, mysql://, mssql://), "
                          "databricks, or '' for the default store")
    allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true")
    if uri and scheme in ("", "file") and not allowed:
        raise ConfigError(f"tracking.uri: {uri!r} is out of range; a file store, which MLflow 3 refuses (every run "
                          "would go untracked); use tracking.uri=sqlite:///DIR/mlflow.db, or set "
                          "MLFLOW_ALLOW_FILE_STORE=true to keep a file store")


def resolve_tracking_uri(uri: str) -> str:
    """The store a run logs to: ``tracking.uri``, else MLflow's own default (MLFLOW_TRACKING_URI,
    or ``mlflow.db`` in the working directory)."""
    import mlflow

    return usable_uri(uri or mlflow.get_tracking_uri())


def quiet_library_logs() -> None:
    """MLflow's INFO lines (its system-metrics monitor starting and stopping, store migrations) stay
    off the console, which shows our own lines; ``simclr --verbose`` shows them. Its warnings and
    errors still show."""
    import logging

    from foundation.logs import verbosity

    if verbosity() == "verbose":
        return
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # it logs every SQL error with its traceback before raising it (8 tracebacks for one full disk); we
    # catch what it raises and name the problem in one line (store_problem)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def open_client(uri: str) -> Any:
    """An MlflowClient for ``uri``. Opening a new sqlite store creates its schema, which breaks when
    several processes (the runs of a local sweep) do it at once, so they take turns on a lock file
    beside the database."""
    from mlflow.tracking import MlflowClient

    quiet_library_logs()
    _fail_fast_over_http()
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return MlflowClient(tracking_uri=uri)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def create_experiment(client: Any, uri: str, name: str) -> str:
    """Create experiment ``name``. On a sqlite store its artifacts go beside the database
    (``mlartifacts/<name>``), not into the working directory of whichever job created it."""
    location = None
    if uri.startswith("sqlite:///"):
        location = str(Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" / name)
    # MLflow 3's UI opens an experiment without a kind in its GenAI workspace; ours are model training
    return client.create_experiment(name, artifact_location=location,
                                    tags={EXPERIMENT_KIND: "custom_model_development"})


EXPERIMENT_KIND = "mlflow.experimentKind"


def _fail_fast_over_http() -> None:
    """MLflow retries an unreachable server for minutes by default; our queue does the retrying,
    so each request fails fast. Set when the first client is made, never at import, and only
    where the user has not chosen values."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def store_problem(exc: BaseException) -> str:
    """What an MLflow store error means, in words, with what to do: a store another MLflow version
    made, a file store (MLflow 3 refuses them), a full disk, or a store that did not answer."""
    import re

    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    if "database or disk is full" in low or "no space left" in low:
        return "the store's disk is full; free space there"
    found = re.search(r"found version (\w+), but expected (\w+)", text)
    if found:
        import mlflow

        migrations = Path(mlflow.__file__).parent / "store" / "db_migrations" / "versions"
        if any(migrations.glob(f"{found.group(1)}_*.py")):
            return (f"the store was made by an older MLflow (schema {found.group(1)}; this MLflow {mlflow.__version__} "
                    f"expects {found.group(2)}); back it up, then upgrade it with: mlflow db upgrade URI, or use "
                    "another tracking.uri")
        return (f"the store was made by a newer MLflow than this one ({mlflow.__version__}; its schema "
                f"{found.group(1)} is unknown here); use that MLflow version or another tracking.uri (do not run "
                "mlflow db upgrade: it cannot downgrade)")
    if "filesystem tracking backend" in low or "file store" in low:
        return ("MLflow 3 refuses file stores (file:///dir, ./mlruns); use tracking.uri=sqlite:///DIR/mlflow.db, or "
                "set MLFLOW_ALLOW_FILE_STORE=true")
    return f"unreachable: {text.splitlines()[0][:200] if text else type(exc).__name__}"


# MLflow 3's UI opens in its GenAI view unless the address asks for the model-training one
TRAINING_VIEW = "?workflowType=machine_learning"


def where_to_open(uri: str, run_id: str | None = None, experiment_id: str = "") -> str:
    """How a person opens ``uri`` in a browser, in MLflow's model-training view: a tracking server is
    a web UI already (the run's own page when known); a local store needs ``mlflow ui`` started on it."""
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        if run_id and experiment_id:
            return f"open {base}/#/experiments/{experiment_id}/runs/{run_id}{TRAINING_VIEW}"
        return f"open {base}/#/experiments{TRAINING_VIEW}"
    page = f"experiments/{experiment_id}/runs/{run_id}" if run_id and experiment_id else "experiments"
    return f"open the UI with: mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000/#/{page}{TRAINING_VIEW}"


def prepare_store(cfg: TrackingConfig) -> None:
    """Create the store's schema and the experiment once, from the submitting process, so that the
    tasks of a job array do not race to initialise a shared (e.g. sqlite) store."""
    if not cfg.enabled:
        return
    try:
        uri = resolve_tracking_uri(cfg.uri)
        client = open_client(uri)
        if client.get_experiment_by_name(cfg.experiment) is None:
            create_experiment(client, uri, cfg.experiment)
    except Exception as exc:  # the jobs fall back to offline metrics on their own
        tracking_log.warning(f"could not prepare MLflow store ({exc}); jobs will retry")
