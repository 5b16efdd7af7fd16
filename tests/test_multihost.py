"""Multi-host: the chess smoke preset as 2 local processes x 2 CPU devices gives the results of 1 process x 4."""
import glob
import json
import os
import socket
import subprocess
import sys

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


def test_two_processes_equal_one_process(tmp_path):
    main = os.path.join(REPO, "launch", "main.py")
    single = str(tmp_path / "single")
    proc = subprocess.run([sys.executable, main, *ARGS, f"--workdir={single}"], cwd=REPO, env=_env(4),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    multi = str(tmp_path / "multi")
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, main, *ARGS, f"--workdir={multi}", "--config.distributed.mode=explicit",
         f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
         f"--config.distributed.process_id={i}"],
        cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "Weak-to-strong results" in outs[0][0]  # only process 0 reports
    assert "Weak-to-strong results" not in outs[1][0]
    assert _runs(multi) == _runs(single)
    for name in os.listdir(os.path.join(single, "predictions")):
        with open(os.path.join(single, "predictions", name)) as a, open(os.path.join(multi, "predictions", name)) as b:
            assert a.read() == b.read()


def test_the_documented_two_process_command_is_one_run(tmp_path):
    """The command of docs/LAUNCH.md, started once per process with no distributed.mode: coordinator, process count
    and id alone make the two processes one run (they once ran as two independent single-process jobs on the same
    workdir). Cut down with the brief's small overrides to stay near a minute on 2 cores."""
    main = os.path.join(REPO, "launch", "main.py")
    port = _free_port()
    small = ["--config.experiment.chains=", "--config.experiment.losses=xent",
             "--config.experiment.ground_truth=weak,strong", "--config.task.n_train=32", "--config.task.n_test=16",
             "--config.task.max_corpus_games=50", "--config.pretrain.steps=2", "--config.train.batch_size=8",
             "--config.eval.batch_size=16"]
    workdir = str(tmp_path / "run")
    procs = [subprocess.Popen(
        [sys.executable, main, "--config=configs/chess.py:smoke",
         f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
         f"--config.distributed.process_id={i}", *small, f"--workdir={workdir}"],
        cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err[-3000:]
        assert f"distributed: process {i} of 2 (coordinator 127.0.0.1:{port})" in err
    assert "results: " in outs[0][0] and "results: " not in outs[1][0]  # only process 0 reports
    assert [r["name"] for r in _runs(workdir)] == ["gt_weak", "gt_strong", "w2s_weak_to_strong_xent"]
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(tmp_path, "**", "results.json"),
                                                          recursive=True)) == ["results.json"]
