"""Multi-host: the chess smoke preset as 2 local processes x 2 CPU devices gives the results of 1 process x 4."""
import glob
import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A cut-down smoke run: one pair, one loss, few examples; the point is the multi-process machinery.
ARGS = ["--config=configs/chess.py:smoke", "--config.experiment.chains=", "--config.experiment.losses=xent",
        "--config.experiment.ground_truth=weak,strong",
        "--config.task.n_train=64", "--config.task.n_test=32", "--config.task.max_corpus_games=100",
        "--config.pretrain.steps=4", "--config.train.batch_size=8", "--config.eval.batch_size=16",
        "--config.mesh.fsdp=4"]


def _env(devices):
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runs(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)["runs"]


@pytest.mark.slow(270)
def test_two_processes_equal_one_process(tmp_path):
    """The two-process command of docs/LAUNCH.md, started once per process with no distributed.mode: coordinator,
    process count and id alone make the two processes one run (they once ran as two independent single-process
    jobs on the same workdir), and it gives the numbers and predictions of one process with as many devices."""
    main = os.path.join(REPO, "launch", "main.py")
    single = str(tmp_path / "single")
    proc = subprocess.run([sys.executable, main, *ARGS, f"--workdir={single}"], cwd=REPO, env=_env(4),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    multi = str(tmp_path / "multi")
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, main, *ARGS, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
         "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}", f"--workdir={multi}"],
        cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=900) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err[-3000:]
        assert f"distributed: process {i} of 2 (coordinator 127.0.0.1:{port})" in err
    assert "Weak-to-strong results" in outs[0][0]  # only process 0 reports
    assert "Weak-to-strong results" not in outs[1][0]
    assert sorted(os.path.relpath(p, multi) for p in glob.glob(os.path.join(multi, "**", "results.json"),
                                                               recursive=True)) == ["results.json"]
    assert [r["name"] for r in _runs(multi)] == ["gt_weak", "gt_strong", "w2s_weak_to_strong_xent"]
    assert _runs(multi) == _runs(single)
    for name in os.listdir(os.path.join(single, "predictions")):
        with open(os.path.join(single, "predictions", name)) as a, open(os.path.join(multi, "predictions", name)) as b:
            assert a.read() == b.read()
