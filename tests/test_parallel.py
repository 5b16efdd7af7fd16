"""Mesh, sharding rules and sharded loading on the 8 virtual CPU devices set up by conftest.py."""
import os
import signal
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from w2s_jax import parallel
from w2s_jax.errors import UserError
from w2s_jax.models import convert
from w2s_jax.models.llama import LlamaConfig, LlamaForCausalLM

CFG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
MESH_CFG = {"data": 1, "fsdp": 4, "tensor": 2}


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "conftest.py should provide 8 CPU devices"
    return parallel.make_mesh(MESH_CFG)


def example_ids(batch=8, length=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (batch, length)), jnp.int32)


def init_params(cfg, seed=0):
    params = LlamaForCausalLM(cfg).init(jax.random.key(seed), example_ids(1, 4))["params"]
    return nn.meta.unbox(params)


def next_token_loss(params, cfg, ids):
    logits = LlamaForCausalLM(cfg).apply({"params": params}, ids)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()


def spec_of(x):
    return tuple(x.sharding.spec)


# ---------------------------------------------------------------------------------------------------------------
# Mesh


def test_make_mesh_sizes():
    mesh = parallel.make_mesh({"fsdp": -1, "tensor": 2})
    assert mesh.axis_names == parallel.MESH_AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert parallel.mesh_shape({"data": 2, "fsdp": -1}, 8) == (2, 4, 1)
    assert parallel.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:2]).size == 2


@pytest.mark.parametrize("sizes,message", [
    ({"data": 1, "fsdp": 3, "tensor": 2}, r"multiply to 6 but there are 8 devices"),
    ({"fsdp": -1, "tensor": 3}, r"\(product 3\) do not divide the 8 devices"),
    ({"data": -1, "fsdp": -1}, r"at most one axis may be -1"),
    ({"model": 8}, r"unknown axes \['model'\]"),
    ({"fsdp": 0, "tensor": 8}, r"sizes must be positive"),
])
def test_make_mesh_errors(sizes, message):
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(sizes)


TRAIN = parallel.Batch(32, 4, "train.batch_size", "train.microbatches")  # the llama2 presets: 8 rows a microbatch
EVAL = parallel.Batch(32, 1, "eval.batch_size")


@pytest.mark.parametrize("sizes,devices,batches,shape", [
    ({"data": 1, "fsdp": -1, "tensor": 1}, 64, [TRAIN, EVAL], (1, 8, 8)),  # llama2 on v5e-64
    ({"fsdp": -1}, 16, [TRAIN, EVAL], (1, 8, 2)),  # v4-32
    ({"fsdp": -1}, 8, [TRAIN, EVAL], (1, 8, 1)),  # 8 GPUs: unchanged
    ({"fsdp": -1}, 64, [parallel.Batch(32)], (1, 32, 2)),
    ({"fsdp": -1}, 8, [parallel.Batch(4)], (1, 4, 2)),
    ({"fsdp": -1}, 7, [parallel.Batch(32)], (1, 1, 7)),  # a prime count that does not divide the batch
    ({"fsdp": -1}, 13, [parallel.Batch(26)], (1, 13, 1)),  # ... and one that does
    ({"data": 2, "fsdp": -1}, 16, [parallel.Batch(8)], (2, 4, 2)),
    ({"fsdp": -1, "tensor": 2}, 64, [parallel.Batch(8)], (1, 8, 8)),  # the rest multiplies a given tensor size
    ({"data": -1, "fsdp": 1}, 8, [parallel.Batch(2)], (2, 1, 4)),
    ({"fsdp": 1, "tensor": -1}, 8, [parallel.Batch(4)], (1, 1, 8)),  # -1 on tensor: the batch axes are given
    ({"fsdp": -1}, 64, [], (1, 64, 1)),  # no batches: as before
])
def test_minus_one_batch_axis_fits_every_batch_and_microbatch(sizes, devices, batches, shape):
    """A -1 on data or fsdp takes the largest size that splits every (micro)batch; the rest goes to tensor."""
    assert parallel.mesh_shape(sizes, devices, batches) == shape
    data, fsdp, _ = shape
    assert all(b.rows % (data * fsdp) == 0 for b in batches)


@pytest.mark.parametrize("sizes,devices,batches,message", [
    ({"data": 1, "fsdp": 64, "tensor": 1}, 64, [EVAL],
     "eval.batch_size=32 is not a multiple of the 64 devices of the batch axes data x fsdp = 1 x 64, over which "
     "every batch is split; use a larger batch or move devices to mesh.tensor"),
    ({"data": 3, "fsdp": -1}, 6, [parallel.Batch(8, 1, "train.batch_size")],
     "train.batch_size=8 is not a multiple of the 6 devices of the batch axes data x fsdp = 3 x 2, over which "
     "every batch is split; use a larger batch or move devices to mesh.tensor"),
    ({"fsdp": 1, "tensor": -1, "data": 5}, 10, [parallel.Batch(8, 1, "eval.batch_size")],
     "eval.batch_size=8 is not a multiple of the 5 devices of the batch axes data x fsdp = 5 x 1"),
    ({"fsdp": -1}, 8, [parallel.Batch(32, 3, "train.batch_size", "train.microbatches")],
     "train.batch_size=32 is not a multiple of train.microbatches=3"),
])
def test_mesh_that_cannot_split_a_batch_is_a_one_line_error(sizes, devices, batches, message):
    with pytest.raises(UserError) as e:
        parallel.mesh_shape(sizes, devices, batches)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_uneven_microbatch_on_a_given_mesh_is_a_warning(caplog):
    """It runs (XLA reshards the microbatch), but some devices compute on padding: a warning, not an error."""
    with caplog.at_level("WARNING", logger="w2s_jax.parallel"):
        assert parallel.mesh_shape({"fsdp": 16}, 16, [TRAIN]) == (1, 16, 1)
    assert "each microbatch has 8 rows (train.batch_size=32 / train.microbatches=4 = 8 rows)" in caplog.text


def test_make_mesh_fits_batches_on_the_virtual_devices(caplog):
    with caplog.at_level("INFO", logger="w2s_jax.parallel"):
        mesh = parallel.make_mesh({"fsdp": -1}, batches=[parallel.Batch(4, 1, "eval.batch_size")])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert "fsdp=-1 would split each batch 8 ways, more than eval.batch_size=4 allows; using data=1 x fsdp=4 x " \
           "tensor=2" in caplog.text
    rows = jax.device_put(np.arange(4.0), parallel.batch_sharding(mesh))  # a batch of 4 now splits
    assert rows.sharding.shard_shape(rows.shape) == (1,)


# ---------------------------------------------------------------------------------------------------------------
# Rules


def test_default_param_shardings(mesh):
    shardings = parallel.param_shardings(LlamaForCausalLM(CFG), example_ids(1, 4), mesh)
    layer = shardings["layers_0"]
    assert tuple(shardings["embed_tokens"]["embedding"].spec) == ("tensor", "fsdp")
    assert tuple(layer["self_attn"]["q_proj"]["kernel"].spec) == ("fsdp", "tensor")
    assert tuple(layer["self_attn"]["o_proj"]["kernel"].spec) == ("tensor", "fsdp")
    assert tuple(layer["mlp"]["down_proj"]["kernel"].spec) == ("tensor", "fsdp")
    assert tuple(shardings["lm_head"]["kernel"].spec) == ("fsdp", "tensor")
    assert tuple(layer["input_layernorm"]["scale"].spec) == (None,)
    assert parallel.batch_sharding(mesh).spec == P(("data", "fsdp"))


def test_rules_override_from_config_lists(mesh):
    rules = [["embed", None], ["mlp", ["fsdp", "tensor"]], ["heads", "tensor"], ["vocab", "tensor"],
             ["batch", "data"]]
    shardings = parallel.param_shardings(LlamaForCausalLM(CFG), example_ids(1, 4), mesh, rules)
    assert tuple(shardings["layers_1"]["mlp"]["gate_proj"]["kernel"].spec) == (None, ("fsdp", "tensor"))
    assert tuple(shardings["layers_1"]["self_attn"]["q_proj"]["kernel"].spec) == (None, "tensor")
    assert parallel.batch_sharding(mesh, rules).spec == P("data")
    with pytest.raises(ValueError, match=r"unknown mesh axis 'model'"):
        parallel.resolve_rules([("embed", "model")])


def test_scanned_layers_axis_is_replicated(mesh):
    cfg = CFG.replace(scan_layers=True)
    shardings = parallel.param_shardings(LlamaForCausalLM(cfg), example_ids(1, 4), mesh)
    assert tuple(shardings["layers"]["mlp"]["up_proj"]["kernel"].spec) == (None, "fsdp", "tensor")


def test_indivisible_dim_falls_back_to_replicated(mesh):
    cfg = CFG.replace(vocab_size=99)
    with pytest.warns(UserWarning) as record:
        shardings = parallel.param_shardings(LlamaForCausalLM(cfg), example_ids(1, 4), mesh)
    assert sorted(str(w.message) for w in record) == [
        "embed_tokens/embedding: dim 0 ('vocab', size 99) is not divisible by mesh axes 'tensor' (size 2); "
        "keeping that dim replicated",
        "lm_head/kernel: dim 1 ('vocab', size 99) is not divisible by mesh axes 'tensor' (size 2); "
        "keeping that dim replicated"]
    assert tuple(shardings["lm_head"]["kernel"].spec) == ("fsdp", None)
    assert tuple(shardings["embed_tokens"]["embedding"].spec) == (None, "fsdp")


# ---------------------------------------------------------------------------------------------------------------
# Sharded computation equals single-device computation


def test_sharded_forward_and_grad_match_single_device(mesh):
    params = init_params(CFG)
    ids = example_ids()
    ref_logits = LlamaForCausalLM(CFG).apply({"params": params}, ids)
    ref_loss, ref_grads = jax.value_and_grad(next_token_loss)(params, CFG, ids)

    shardings = parallel.param_shardings(LlamaForCausalLM(CFG), ids, mesh)
    sharded = parallel.shard_params(params, shardings)
    sharded_ids = jax.device_put(ids, parallel.batch_sharding(mesh))
    forward = jax.jit(lambda p, x: LlamaForCausalLM(CFG).apply({"params": p}, x))
    grad_fn = jax.jit(jax.value_and_grad(next_token_loss), static_argnums=1, out_shardings=(None, shardings))
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
        logits = forward(sharded, sharded_ids)
        loss, grads = grad_fn(sharded, CFG, sharded_ids)

    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(loss), float(ref_loss), atol=1e-6, rtol=0)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=0),
                 grads, ref_grads)
    # Grads come back sharded like the params; each device holds 1/8 of every matrix.
    for tree in (sharded, grads):
        for x in jax.tree.leaves(tree):
            if x.ndim == 2:
                assert len(x.addressable_shards) == 8
                assert {s.data.size for s in x.addressable_shards} == {x.size // 8}, x.sharding
    q = sharded["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert {s.data.shape for s in q.addressable_shards} == {(16, 32)}


# ---------------------------------------------------------------------------------------------------------------
# Sharded loading


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    convert.save_hf(CFG, init_params(CFG, seed=3), path)
    return path


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_load_hf_with_mesh_places_shards(mesh, checkpoint, scan, monkeypatch):
    reads = []
    original_read = convert._Reader.read

    def recording_read(self, name, index=None):
        out = original_read(self, name, index)
        reads.append((name, out.size))
        return out

    _, full = convert.load_hf(checkpoint, scan_layers=scan)
    monkeypatch.setattr(convert._Reader, "read", recording_read)
    cfg, params = convert.load_hf(checkpoint, scan_layers=scan, mesh=mesh)

    expected = parallel.param_shardings(LlamaForCausalLM(cfg), example_ids(1, 4), mesh)
    jax.tree.map(lambda x, s: (x.sharding.is_equivalent_to(s, x.ndim)) or pytest.fail(f"{x.sharding} != {s}"),
                 params, expected)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), params, full)
    # No read ever pulled a whole matrix: each is 1/8 of the tensor (norms are replicated and read whole, once).
    q_size = CFG.hidden_size * CFG.num_attention_heads * CFG.head_dim
    q_reads = [size for name, size in reads if name.endswith("q_proj.weight")]
    assert q_reads and set(q_reads) == {q_size // 8}
    assert max(size for name, size in reads if "norm" not in name) == CFG.vocab_size * CFG.hidden_size // 8
    assert sum(1 for name, _ in reads if name == "model.norm.weight") == 1


# ---------------------------------------------------------------------------------------------------------------
# Distributed start-up settings (no processes are started here)


def test_distributed_settings_from_config_and_environment():
    env = {"W2S_COORDINATOR": "10.0.0.1:1234", "W2S_NUM_PROCESSES": "4", "W2S_PROCESS_ID": "2"}
    s = parallel.distributed_settings(None, environ=env)
    assert (s["mode"], s["coordinator_address"], s["num_processes"], s["process_id"]) == (
        "auto", "10.0.0.1:1234", 4, 2)
    s = parallel.distributed_settings({"mode": "explicit", "process_id": 3}, environ=env)
    assert (s["mode"], s["process_id"]) == ("explicit", 3)  # the config wins over the environment
    with pytest.raises(ValueError, match=r"W2S_NUM_PROCESSES.*'four'"):
        parallel.distributed_settings(None, environ={"W2S_NUM_PROCESSES": "four"})
    with pytest.raises(UserError, match="distributed.mode='sometimes'"):
        parallel.distributed_settings({"mode": "sometimes"}, environ={})


@pytest.mark.parametrize("environ,found", [
    ({}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1,t1k-w-2,t1k-w-3"}, "TPU_WORKER_HOSTNAMES lists 4 hosts"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # a single-host TPU VM
    ({"MEGASCALE_NUM_SLICES": "2"}, "MEGASCALE_NUM_SLICES=2"),
    ({"SLURM_NTASKS": "4"}, "SLURM_NTASKS=4"),
    ({"SLURM_NTASKS": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "8"}, "OMPI_COMM_WORLD_SIZE=8"),
])
def test_detect_cluster_from_the_environment(environ, found):
    assert parallel.detect_cluster(environ) == found


def test_jax_cluster_detection_counts_and_mode_off_refuses_it(monkeypatch):
    """The real environment also goes through JAX's own detection: here a 2-task Slurm step."""
    slurm = {"SLURM_JOB_ID": "123", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert parallel._jax_detected_cluster() == "JAX detects a SlurmCluster of 2 processes"
    monkeypatch.setattr(parallel, "_single_process_decided", False)
    with pytest.raises(UserError, match=r"mode='off' but this process is one of a multi-process launch "
                                        r"\(SLURM_NTASKS=2\)"):
        parallel.init_distributed({"mode": "off"})
    assert not jax.distributed.is_initialized()


def plan(cfg, cluster=None, environ=None):
    return parallel.distributed_plan(parallel.distributed_settings(cfg, environ=environ or {}), cluster)


GIVEN = {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}


def test_given_settings_mean_a_multi_process_run():
    assert plan(GIVEN) == GIVEN  # mode unset: auto
    assert plan({"mode": "explicit", **GIVEN}) == GIVEN
    assert plan({}, environ={"W2S_COORDINATOR": "h:1", "W2S_NUM_PROCESSES": "2", "W2S_PROCESS_ID": "0"}) == {
        "coordinator_address": "h:1", "num_processes": 2, "process_id": 0}
    assert plan({}, cluster="SLURM_NTASKS=4") == {}  # JAX's cluster detection fills in everything
    assert plan({"num_processes": 4}, cluster="SLURM_NTASKS=4") == {"num_processes": 4}
    assert plan({}) is None  # nothing given, no launch seen: one process
    assert plan({"mode": "off"}) is None
    assert plan({"mode": "off", "num_processes": 1}, cluster="SLURM_NTASKS=4") is None  # this process alone
    assert plan({"num_processes": 1}) is None


@pytest.mark.parametrize("cfg,cluster,message", [
    ({"mode": "off", "coordinator_address": "127.0.0.1:1234"}, None,
     "distributed.mode='off' but coordinator_address='127.0.0.1:1234' (W2S_COORDINATOR) given, which make a "
     "multi-process run: set distributed.mode=auto for one, or unset them for a single process"),
    ({"mode": "off"}, "TPU_WORKER_HOSTNAMES lists 4 hosts",
     "distributed.mode='off' but this process is one of a multi-process launch (TPU_WORKER_HOSTNAMES lists 4 "
     "hosts): every process would train alone and write the same workdir. Set distributed.mode=auto"),
    ({"num_processes": 2}, None,
     "num_processes=2 (W2S_NUM_PROCESSES) given, so this is a multi-process run, but it lacks coordinator_address "
     "(W2S_COORDINATOR), process_id (W2S_PROCESS_ID)"),
    ({**GIVEN, "process_id": 2}, None,
     "distributed.process_id=2 is not below num_processes=2: the processes are numbered 0 .. 1"),
    ({"num_processes": 0}, None, "distributed.num_processes=0 (W2S_NUM_PROCESSES): must be at least 1"),
    ({"mode": "explicit", "num_processes": 2}, "SLURM_NTASKS=2",
     "distributed mode 'explicit' needs coordinator_address (W2S_COORDINATOR), process_id (W2S_PROCESS_ID)"),
])
def test_contradicting_settings_are_one_user_error(cfg, cluster, message):
    with pytest.raises(UserError) as e:
        plan(cfg, cluster)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_mode_off_with_w2s_environment_variables_is_an_error():
    with pytest.raises(UserError, match=r"mode='off' but coordinator_address='h:1' \(W2S_COORDINATOR\)"):
        plan({"mode": "off"}, environ={"W2S_COORDINATOR": "h:1"})


def test_init_distributed_single_process_is_a_noop(monkeypatch):
    for var in ("W2S_COORDINATOR", "W2S_NUM_PROCESSES", "W2S_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(parallel, "_single_process_decided", False)
    with pytest.raises(ValueError, match=r"needs coordinator_address \(W2S_COORDINATOR\), num_processes"):
        parallel.init_distributed({"mode": "explicit"})
    assert parallel.init_distributed({"mode": "explicit", "num_processes": 1}) is False
    assert parallel.init_distributed({"mode": "auto"}) is False  # decided once, then idempotent
    assert not jax.distributed.is_initialized()


TWO_PROCESS_SCRIPT = """
import sys
import numpy as np
from w2s_jax import parallel
pid = int(sys.argv[1])
assert parallel.init_distributed({"mode": "explicit", "coordinator_address": sys.argv[2], "num_processes": 2,
                                  "process_id": pid})
assert parallel.init_distributed(None)  # idempotent
import jax, jax.numpy as jnp
mesh = parallel.make_mesh({"fsdp": -1})
x = jax.make_array_from_process_local_data(parallel.batch_sharding(mesh), np.full((2,), pid + 1, np.float32))
print(jax.process_count(), jax.device_count(), float(jax.jit(jnp.sum)(x)))
"""


def test_init_distributed_two_local_processes(tmp_path):
    """Two CPU processes with 2 devices each form one 4-device mesh and reduce across it (gloo)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    script = tmp_path / "two_process.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, str(script), str(pid), address], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for pid in (0, 1)]
    outputs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("two-process run timed out")
        assert p.returncode == 0, err[-2000:]
        outputs.append(out.strip().splitlines()[-1])
    assert outputs == ["2 4 6.0", "2 4 6.0"]  # rows [1, 1, 2, 2] summed across both processes


PEER_LOSS_SCRIPT = """
import os, signal, sys, time
import numpy as np
from w2s_jax import parallel
pid = int(sys.argv[1])
# No mode: the given settings alone make the run multi-process.
parallel.init_distributed({"coordinator_address": sys.argv[2], "num_processes": 2, "process_id": pid})
from jax.experimental import multihost_utils
for step in range(100):
    if pid == 1 and step == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # a host lost mid-run
    multihost_utils.process_allgather(np.array([step]))
    time.sleep(0.05)
open(sys.argv[3] + str(pid), "w").write("results")  # what a partial world must never reach
"""


def test_losing_a_peer_stops_the_survivor_at_once_without_results(tmp_path):
    """The survivor's next collective fails; it exits 1 with a message at once, not after JAX's heartbeat timeout
    (100 s) in the shutdown barrier, and never reaches the code after its last collective."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    script = tmp_path / "peer_loss.py"
    script.write_text(PEER_LOSS_SCRIPT)
    results = tmp_path / "results"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(pid), address, str(results)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for pid in (0, 1)]
    try:
        _, err = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
    assert procs[1].wait() == -signal.SIGKILL
    assert procs[0].returncode == 1, err[-3000:]
    assert "Connection closed by peer" in err
    assert "error: process 0 of 2 stopped on the error above, without waiting for the others." in err
    assert not any(tmp_path.glob("results*"))
