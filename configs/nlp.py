"""Shared builder for the NLP binary-classification configs (configs/sciq.py, boolq.py, ...).

Presets (configs.base.apply_ladder_preset):
  smoke   toy models pretrained here on the task's own unlabelled training texts, a few hundred examples, minutes
          on a CPU. Offline: point `--config.task.data_files=PATH` at local json/jsonl/csv/parquet files.
  tiny    the same with the tiny ladder and a few thousand examples.
  llama2  LLaMA-2 7B weak / 13B strong from Hugging Face checkpoint paths (`--config.models.weak.checkpoint=...`).
"""
from configs.base import apply_ladder_preset, get_base_config
from w2s_jax.data.nlp import default_task_config


def get_nlp_config(name: str, preset: str):
    c = get_base_config()
    c.name = f"{name}_{preset}"
    c.task = default_task_config(name)
    c.task.max_len = 512
    return apply_ladder_preset(c, preset, name)
