"""Reward modeling: pairwise preferences (chosen vs rejected); a scalar head scores prompt + response and the model
is right when the chosen response scores higher. The pairwise form of anthropic_hh fixes the reference's
single-response version, which sits at chance.

    python launch/main.py --config=configs/reward.py:smoke --config.task.data_files=train=a.jsonl,test=b.jsonl
    python launch/main.py --config=configs/reward.py:llama2 --config.task.name=anthropic_hh_pairwise ...

Presets: `smoke` (toy models pretrained here on the training texts, generic `pairwise` files with columns
prompt, chosen, rejected), `tiny`, `llama2` (HF checkpoints). `--config.experiment.methods=genft` adds the paper's
generative finetuning on the task's texts, which it found to help reward modeling most.
"""
from configs.base import apply_ladder_preset, get_base_config
from w2s_jax.data.reward import default_task_config


def get_config(preset: str = "smoke"):
    c = get_base_config()
    c.name = f"reward_{preset}"
    if preset == "llama2":
        c.task = default_task_config("anthropic_hh_pairwise")
        c.task.max_len = 1024
    else:
        c.task = default_task_config("pairwise")
        c.task.max_len = 512
    apply_ladder_preset(c, preset, "reward")
    if preset == "tiny":
        c.models.mid.lr, c.models.strong.lr = 7e-4, 5e-4
    elif preset == "llama2":
        c.train.microbatches = 8
    return c
