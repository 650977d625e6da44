"""simclr-scale trainer, in rooms by concern (docs/architecture.md): run (the loop and its step),
evaluation, state (checkpoints, resume), config.py, observe, tracking, model, losses, runtime."""

# said by every way a Ctrl-C can end a run before its first step (here: importable before torch loads)
STOPPED_AT_START = "[simclr] SIGINT: stopped during start-up, before the first step; nothing was trained"


def package_version() -> str:
    """The installed simclr-scale's version (importable before torch loads: ``simclr --version``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("simclr-scale")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"
