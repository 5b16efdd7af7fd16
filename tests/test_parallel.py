"""Mesh, sharding rules and sharded loading on the 8 virtual CPU devices set up by conftest.py."""
import os
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
    with pytest.raises(ValueError, match="distributed mode 'sometimes'"):
        parallel.distributed_settings({"mode": "sometimes"}, environ={})


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
