"""The llama1/llama2 presets: they build, shard on virtual devices with abstract shapes, and fail clearly without
checkpoint paths (they cannot run here)."""
import jax
import numpy as np
import pytest

from configs import chess
from w2s_jax import pipeline, train
from w2s_jax.models import presets


@pytest.mark.parametrize("preset, model", [("llama1", "llama1-13b"), ("llama2", "llama2-13b")])
def test_real_preset_shards_every_large_matrix_over_8_devices(preset, model):
    cfg = chess.get_config(preset)
    lcfg = presets.get_preset(model, dtype=cfg.model_defaults.dtype, param_dtype=cfg.model_defaults.param_dtype,
                              scan_layers=cfg.model_defaults.scan_layers, remat_policy=cfg.model_defaults.remat_policy)
    runtime = train.make_runtime({"data": 1, "fsdp": 4, "tensor": 2})
    tx = train.make_optimizer(cfg.train, 1000, 1e-5)
    abstract, shardings = train.state_shardings(lcfg, None, tx, runtime)
    total = 0
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(abstract.params),
                                      jax.tree.leaves(shardings.params)):
        total += int(np.prod(leaf.shape))
        if leaf.ndim >= 2 and min(leaf.shape[-2:]) >= 4096:  # every weight matrix (stacked over layers)
            shard = sharding.shard_shape(leaf.shape)
            assert np.prod(shard) * 8 == np.prod(leaf.shape), (jax.tree_util.keystr(path), shard, leaf.shape)
    assert total == lcfg.num_params == presets.get_preset(model).num_params  # ~13.0e9
    # the Adam moments follow the params' sharding
    mu = [s for s in jax.tree.leaves(shardings.opt_state) if hasattr(s, "spec")]
    assert any(tuple(s.spec) != () for s in mu)


@pytest.mark.parametrize("preset", ["llama1", "llama2"])
def test_real_preset_without_checkpoint_paths_fails_clearly(preset):
    with pytest.raises(ValueError) as err:
        pipeline.validate_config(chess.get_config(preset))
    assert "models.weak.checkpoint is empty" in str(err.value)
    assert "models.strong.checkpoint is empty" in str(err.value)
