"""Reward modeling: pairwise preferences (chosen vs rejected); a scalar head scores prompt + response and the model
is right when the chosen response scores higher. The pairwise form of anthropic_hh fixes the reference's
single-response version, which sits at chance.

    python launch/main.py --config=configs/reward.py:smoke --config.task.data_files=train=a.jsonl,test=b.jsonl
    python launch/main.py --config=configs/reward.py:llama2 --config.task.name=anthropic_hh_pairwise ...

Presets: `smoke` (toy models pretrained here on the training texts, generic `pairwise` files with columns
prompt, chosen, rejected), `tiny`, `llama2` (HF checkpoints). `--config.experiment.methods=genft` adds the paper's
generative finetuning on the task's texts, which it found to help reward modeling most.
"""
from configs.base import get_base_config, model
from w2s_jax.data.reward import default_task_config


def get_config(preset: str = "smoke"):
    c = get_base_config()
    c.name = f"reward_{preset}"
    c.task = default_task_config("pairwise")
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
        c.models.mid = model(preset="tiny-m", lr=7e-4)
        c.models.strong = model(preset="tiny-l", lr=5e-4)
        c.experiment.chains = "weak->mid->strong"
    elif preset == "llama2":
        c.task = default_task_config("anthropic_hh_pairwise")
        c.task.max_len = 1024
        c.models.weak = model(source="hf", lr=1e-5)
        c.models.strong = model(source="hf", lr=1e-5)
        c.tokenizer.source = "model"
        c.model_defaults.update(dtype="bfloat16", scan_layers=True, remat_policy="full")
        c.train.update(microbatches=8, checkpoint_every=100)
    else:
        raise ValueError(f"unknown reward preset {preset!r}: expected smoke, tiny or llama2")
    return c
