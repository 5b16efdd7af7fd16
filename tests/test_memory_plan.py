"""bench/memory.py: the compiled train step's per-device memory on a virtual CPU mesh (micro-s preset, 8 devices)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "memory.py"
GIB = 1 << 30

# micro-s: hidden 32, 2 layers, 2 heads x 16, MLP 128, vocab 512, untied; fp32 params (the llama2 config).
MATRIX_PARAMS = 2 * 512 * 32 + 2 * (4 * 32 * 32 + 3 * 32 * 128)  # embed + lm_head + q,k,v,o + gate,up,down
NORM_PARAMS = 2 * 2 * 32 + 32  # two RMSNorm scales per layer + the final one
HBM_GIB = 0.0001  # ~105 KB: less than this step needs


def run_tool(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(SCRIPT), "--config=configs/chess.py:llama2", *args], cwd=REPO,
                          env=env, text=True, capture_output=True, timeout=300)


def load_module():
    spec = importlib.util.spec_from_file_location("bench_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_plan(_folder):
    proc = run_tool("--model=micro-s", "--devices=8", "--mesh.data=1", "--mesh.fsdp=4", "--mesh.tensor=2",
                    "--batch=8", "--microbatches=1", "--seq=32", "--scored=16", "--candidates=8",
                    f"--hbm_gib={HBM_GIB}", "--config.model_defaults.attention=jax")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def plan(once_per_session):
    return once_per_session("memory_plan", make_plan)[1]


def test_plan_reports_the_requested_setup(plan):
    assert plan["devices"] == 8
    assert plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert (plan["model"], plan["remat"], plan["scan_layers"]) == ("micro-s", "full", True)  # the llama2 config's
    assert (plan["dtype"], plan["param_dtype"]) == ("bfloat16", "float32")
    assert (plan["batch"], plan["microbatches"], plan["seq"], plan["scored"]) == (8, 1, 32, 16)
    assert plan["platform"] == "cpu"
    # jax's attention runs cuDNN's kernel on a GPU, which a CPU compile cannot plan: the plan says so
    assert plan["attention"] == "jax"
    assert any("planned as the own attention" in note for note in plan["notes"])


def test_param_bytes_are_split_over_the_mesh(plan):
    assert plan["num_params"] == MATRIX_PARAMS + NORM_PARAMS == 65696
    assert plan["total_param_bytes"] == 4 * 65696
    # Every matrix is sharded on fsdp (embed) x tensor (heads/mlp/vocab) = 8 ways; the norm scales are replicated.
    per_device = plan["per_device_analytic"]["params"]
    assert per_device == 4 * MATRIX_PARAMS // 8 + 4 * NORM_PARAMS == 33408
    # Adam: two moments shaped like the params, plus int32 step counters.
    assert 2 * per_device <= plan["per_device_analytic"]["opt_state"] <= 2 * per_device + 16


def test_compiled_totals_are_consistent(plan):
    c, a = plan["per_device_compiled"], plan["per_device_analytic"]
    state = a["params"] + a["opt_state"] + a["step"]
    assert state <= c["arguments"] <= state + a["batch"]
    assert c["aliased"] >= a["params"] + a["opt_state"]  # the state is donated: its outputs reuse its buffers
    assert plan["per_device_bytes"] == c["arguments"] + c["outputs"] - c["aliased"] + c["temporaries"]
    assert c["temporaries"] > a["params"]  # at least the fp32 gradients


def test_fits_follows_hbm_gib(plan):
    assert plan["hbm_gib"] == HBM_GIB
    assert plan["per_device_bytes"] > HBM_GIB * GIB
    assert plan["fits"] is False
    assert plan["hbm_fraction"] == round(plan["per_device_bytes"] / (HBM_GIB * GIB), 4)
    memory = load_module()
    assert memory.fits(1024, 1024 / GIB) is True
    assert memory.fits(1025, 1024 / GIB) is False
    assert memory.fits(1025, None) is None


def test_force_host_devices_replaces_an_earlier_count():
    memory = load_module()
    env = {"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8"}
    memory.force_host_devices(64, env)
    assert env == {"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=64", "JAX_PLATFORMS": "cpu"}


@pytest.mark.parametrize("args, message", [
    (("--devices=6", "--mesh.fsdp=4", "--mesh.tensor=2"),
     "error: mesh config {'data': 1, 'fsdp': 4, 'tensor': 2}: sizes multiply to 8 but there are 6 devices"),
    (("--devices=8", "--mesh.fsdp=8", "--batch=12", "--microbatches=1"),
     "error: --batch=12 is not a multiple of the 8 devices of the batch axes data x fsdp = 1 x 8"),
    (("--devices=8", "--batch=32", "--microbatches=3"), "error: --batch=32 is not a multiple of --microbatches=3"),
])
def test_bad_mesh_or_batch_is_a_clear_error(args, message):
    proc = run_tool("--model=micro-s", *args)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
