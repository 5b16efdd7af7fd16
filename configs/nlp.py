"""Shared builder for the NLP binary-classification configs (configs/sciq.py, boolq.py, ...).

Presets:
  smoke   toy models pretrained here on the task's own unlabelled training texts, a few hundred examples, minutes
          on a CPU. Offline: point `--config.task.data_files=PATH` at local json/jsonl/csv/parquet files.
  tiny    the same with the tiny ladder and a few thousand examples.
  llama2  LLaMA-2 7B weak / 13B strong from Hugging Face checkpoint paths (`--config.models.weak.checkpoint=...`).
"""
from configs.base import get_base_config, model
from w2s_jax.data.nlp import default_task_config


def get_nlp_config(name: str, preset: str):
    c = get_base_config()
    c.name = f"{name}_{preset}"
    c.task = default_task_config(name)
    c.task.max_len = 512
    c.experiment.pairs = "weak->strong"
    c.experiment.losses = "xent,logconf"
    if preset == "smoke":
        c.task.update(n_train=256, n_test=64, max_len=256)
        c.tokenizer.vocab_size = 512
        c.models.weak = model(preset="micro-s", lr=1e-3)
        c.models.strong = model(preset="micro-m", lr=1e-3)
        c.pretrain.update(steps=20, batch_size=16, seq_len=128)
        c.genft.update(steps=10, batch_size=8, seq_len=64)
        c.train.update(batch_size=16, epochs=1.0, checkpoint_every=4)
        c.eval.batch_size = 32
    elif preset == "tiny":
        c.task.update(n_train=4000, n_test=500)
        c.models.weak = model(preset="tiny-s", lr=1e-3)
        c.models.mid = model(preset="tiny-m", lr=5e-4)
        c.models.strong = model(preset="tiny-l", lr=3e-4)
        c.experiment.chains = "weak->mid->strong"
    elif preset == "llama2":
        c.models.weak = model(source="hf", lr=1e-5)
        c.models.strong = model(source="hf", lr=1e-5)
        c.tokenizer.source = "model"
        c.model_defaults.update(dtype="bfloat16", scan_layers=True, remat_policy="full")
        c.train.update(microbatches=4, checkpoint_every=100)
    else:
        raise ValueError(f"unknown preset {preset!r} for {name}: expected smoke, tiny or llama2")
    return c
