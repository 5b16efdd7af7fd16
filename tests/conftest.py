"""Test session setup: 8 virtual CPU devices so sharding tests run anywhere (must precede any jax import), and
the slow tests first; costly fixtures built once for all pytest-xdist workers."""
import fcntl
import json
import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()


def pytest_collection_modifyitems(items):
    """The slow tests first, longest first (`@pytest.mark.slow(seconds)`), so that with `-n 2` no long test starts
    last on one worker while the other sits idle."""
    def seconds(item):
        mark = item.get_closest_marker("slow")
        return mark.args[0] if mark else 0
    items.sort(key=seconds, reverse=True)


@pytest.fixture(scope="session")
def once_per_session(tmp_path_factory):
    """`once_per_session(name, build)`: `build(folder)`'s JSON-able result, computed once per test session however
    many xdist workers ask (each worker builds its own module-scoped fixtures): the first computes it in a folder
    every worker sees, under a file lock; the others wait and read it. Returns (folder, result)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # workers: pytest-N/popen-gwI

    def run(name: str, build):
        folder, done = root / name, root / f"{name}.json"
        with open(root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                folder.mkdir(exist_ok=True)
                done.write_text(json.dumps(build(folder)))
        return folder, json.loads(done.read_text())
    return run
