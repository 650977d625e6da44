"""Credentials in a store URI (``http://user:secret@host``, ``postgresql://user:secret@db/x``) never
reach a printed line, a param, a tag, an artifact, a run file or a checkpoint.

At load, ``take_credentials`` moves a URI's password into MLflow's own environment variables (the
process and the ranks it starts inherit them; nothing writes them down) and leaves ``user:***@`` in
its place. Every later use goes through ``usable_uri``, which puts the secret back only for the
client that needs it: an HTTP server gets the URI without credentials and MLflow sends
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` as basic auth (so MLflow's own "View run
at ..." lines show no secret either); a database URI is handed over whole, from
``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

MASK = "***"


def _split(uri: str) -> tuple[str, str | None, str | None, str]:
    """(scheme, user, password, URI without the user part) of ``uri``; user and password None when absent."""
    if "://" not in uri:
        return "", None, None, uri
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return parts.scheme, None, None, uri
    userinfo, _, host = parts.netloc.rpartition("@")
    user, has_password, password = userinfo.partition(":")
    return parts.scheme, user, password if has_password else None, urlunsplit(parts._replace(netloc=host))


def redact_uri(uri: str) -> str:
    """``uri`` with its password shown as ``***`` (what is printed and stored)."""
    scheme, user, password, bare = _split(uri)
    if password is None:
        return uri
    parts = urlsplit(bare)
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{parts.netloc}"))


def take_credentials(uri: str) -> str:
    """The redacted ``uri``; its password (if any, and not already ``***``) goes into MLflow's
    environment variables for this process and its children."""
    scheme, user, password, bare = _split(uri)
    if password is None or password == MASK:
        return uri
    if scheme.lower() in ("http", "https"):
        os.environ["MLFLOW_TRACKING_USERNAME"] = user or ""
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    else:  # a database store takes its password only inside the URI
        os.environ["MLFLOW_TRACKING_URI"] = uri
    return redact_uri(uri)


def usable_uri(uri: str) -> str:
    """The URI to hand to an MLflow client for the (possibly redacted) ``uri``."""
    scheme, user, password, bare = _split(uri)
    if scheme.lower() in ("http", "https") and user is not None:
        # credentials travel as basic auth from MLflow's variables, never inside the URI
        if password not in (None, MASK):
            os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = user, password
        return bare
    if password == MASK:
        whole = os.environ.get("MLFLOW_TRACKING_URI", "")
        if redact_uri(whole) == uri:
            return whole
        raise CredentialsMissing(f"{uri} needs its password: set MLFLOW_TRACKING_URI to the whole URI (with the "
                                 "password) in the environment; it is never stored in the run folder")
    return uri


class CredentialsMissing(RuntimeError):
    """A redacted database URI whose password is not in the environment."""


def store_key(uri: str) -> str:
    """``uri`` without its user part: the same store whoever logs into it (``simclr sync`` compares stores so)."""
    return _split(uri)[3]
