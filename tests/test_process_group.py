import json

import pytest

from tests.helpers.runs import run_torchrun

GLOO_THREADS = {"pt_gloo_runloop", "gloo_tcp_loop"}


@pytest.mark.slow
def test_teardown_ends_the_groups_threads_even_after_torchvision_is_imported(tmp_path):
    """Importing torchvision (so torch._dynamo) once the group exists used to keep it alive past
    destroy_process_group: its gloo threads outlived teardown and freed the last collective's
    tensors while the interpreter shut down, killing a finished rank now and then (SIGABRT, SIGBUS)."""
    out = tmp_path / "threads"
    proc = run_torchrun("teardown_threads.py", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        left = GLOO_THREADS & set(json.loads((tmp_path / f"threads.rank{rank}").read_text()))
        assert not left, f"rank {rank} still runs {sorted(left)} after teardown"
