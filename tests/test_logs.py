"""Our lines go through the ``simclr`` logger: the console's words unchanged (INFO on stdout,
warnings on stderr), --quiet and --verbose, and the run's own log in RUN_DIR/simclr.log."""

from __future__ import annotations

from pathlib import Path

import pytest

from foundation.logs import configure, get_logger
from trainer.run.loop import train


@pytest.fixture
def verbosity(monkeypatch):
    """Set this process's verbosity as simclr --quiet/--verbose would; restored after the test."""
    def set_to(level: str) -> None:
        monkeypatch.setenv("SIMCLR_VERBOSITY", level)
        configure(level)

    yield set_to
    monkeypatch.delenv("SIMCLR_VERBOSITY", raising=False)
    configure("")


def test_a_run_says_the_same_words_and_keeps_them_in_its_folder(tiny_config, capsys):
    cfg = tiny_config(**{"tracking.enabled": "false", "train.stop_after_steps": 2})
    train(cfg)
    out = capsys.readouterr().out
    assert "[simclr] run folder " in out and "[simclr] stopped at step 2/" in out
    text = (Path(cfg.train.run_dir) / "simclr.log").read_text()
    assert "INFO simclr: run folder " in text and "INFO simclr: stopped at step 2/" in text
    train(tiny_config(**{"tracking.enabled": "false", "train.stop_after_steps": 4}))  # resumed: appended
    text = (Path(cfg.train.run_dir) / "simclr.log").read_text()
    assert "stopped at step 2/" in text and "resumed from " in text and "stopped at step 4/" in text


def test_quiet_shows_only_warnings_and_verbose_shows_debug_lines(verbosity, capsys):
    log = get_logger("test")
    verbosity("quiet")
    log.info("an info line")
    log.warning("a warning line")
    captured = capsys.readouterr()
    assert "an info line" not in captured.out and "[simclr] warning: a warning line" in captured.err
    verbosity("verbose")
    log.debug("a debug line")
    assert "[simclr] a debug line" in capsys.readouterr().out
    verbosity("")
    log.debug("another debug line")
    log.info("an info line again")
    assert capsys.readouterr().out == "[simclr] an info line again\n"


def test_ranks_other_than_zero_show_only_warnings(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    try:
        configure("")
        get_logger().info("rank 1 info")
        get_logger().warning("rank 1 has something of its own to say")
        captured = capsys.readouterr()
        assert "rank 1 info" not in captured.out and "rank 1 has something" in captured.err
    finally:
        monkeypatch.delenv("RANK")
        configure("")


def test_a_rank_set_after_import_is_honoured_when_the_process_joins(monkeypatch, capsys):
    """submitit exports SLURM's RANK on the task, after our modules were imported: joining the
    process group reads it again, so rank 1 of a SLURM job shows only its warnings."""
    from trainer.runtime.distributed import DistConfig, init_distributed, teardown

    configure("")
    monkeypatch.setenv("RANK", "1")  # WORLD_SIZE unset: this process runs alone, as far as torch goes
    try:
        init_distributed(DistConfig(), "cpu")
        get_logger().info("rank 1 info")
        assert "rank 1 info" not in capsys.readouterr().out
    finally:
        teardown()
        monkeypatch.delenv("RANK")
        configure("")


def test_importing_the_product_sets_up_no_logging_and_each_entry_point_does():
    """A library sets no handlers on import (#43); the entry points do: the simclr command, a rank,
    a benchmark script. In a fresh interpreter: every package imported, no handler on ``simclr``."""
    import subprocess
    import sys

    imports = ("trainer.run.loop", "trainer.evaluation.evaluate", "trainer.evaluation.embed", "launch.cli",
               "data_pipeline.rank_loader",
               "data_pipeline.dali", "benchmarks.common", "foundation.collectives")
    code = (f"import logging, {', '.join(imports)}; handlers = logging.getLogger('simclr').handlers; "
            "assert not handlers, handlers; "
            "from foundation.logs import configure, get_logger; configure(); get_logger().info('hello')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout == "[simclr] hello\n", out.stderr[-2000:]
    for entry in ("launch/cli.py", "trainer/__main__.py", "benchmarks/lars.py"):
        assert "configure()" in (Path(__file__).parents[1] / entry).read_text(), entry
