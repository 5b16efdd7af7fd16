"""Chess puzzles (the paper's generative task): predict the first move of the solution.

Presets (`--config=configs/chess.py:<preset>`):
  ladder  (default) three LLaMA-architecture models that differ in pretraining compute, pretrained once on engine
          games (disjoint from every puzzle's game) with a tokenizer that splits SAN moves into parts, shipped in
          data/chess/ladder and loaded as Hugging Face checkpoints: only finetuning runs here. Weak/strong ground
          truth, naive weak-to-strong, logconf and the bootstrapping chain weak -> mid -> strong, 3 seeds.
  ladder_scratch  the recipe of `ladder`: the same models pretrained here from scratch (what
          launch/pretrain_ladder.py runs once; docs/CHESS_LADDER.md), then the experiment with 4,000 puzzles in
          float32.
  tiny    three models pretrained here for 200 steps each with a whole-move BPE: no capability gap (PGR n/a).
  smoke   the same pipeline at toy size (tests, CI).
  llama1  LLaMA-1 7B weak / 13B strong from Hugging Face checkpoint paths, sharded for TPU/GPU.
  llama2  LLaMA-2 7B weak / 13B strong, likewise.
"""
import os

from configs.base import get_base_config, model
from w2s_jax.data.chess import default_task_config

LADDER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "chess", "ladder")


def get_config(preset: str = "ladder"):
    c = get_base_config()
    c.name = f"chess_{preset}"
    c.task = default_task_config()
    c.task.loader = "chess"
    # choice_lm: each legal move (SAN, leading space) is scored by its log-likelihood after the prompt.
    c.task.scoring = "choice_lm"
    c.task.max_len = 512
    c.experiment.pairs = "weak->strong"
    c.experiment.losses = "xent,logconf"
    c.experiment.chains = "weak->mid->strong"

    if preset == "tiny":
        c.models.weak = model(preset="tiny-s", lr=1e-3)
        c.models.mid = model(preset="tiny-m", lr=7e-4)
        c.models.strong = model(preset="tiny-l", lr=5e-4)
        # Blocks as long as the longest prompt + candidates, so that finetuning never meets unseen positions.
        c.task.max_len = 384
        c.pretrain.update(steps=200, batch_size=16, seq_len=384, lr=3e-3, warmup_steps=20)
        c.train.group_by_length = 8
    elif preset in ("ladder", "ladder_scratch"):
        if preset == "ladder":
            # What launch/pretrain_ladder.py wrote from `ladder_scratch` (docs/CHESS_LADDER.md): only finetuning runs.
            c.models.weak = model(source="hf", checkpoint=os.path.join(LADDER_DIR, "weak"), lr=1e-3)
            c.models.mid = model(source="hf", checkpoint=os.path.join(LADDER_DIR, "mid"), lr=7e-4)
            c.models.strong = model(source="hf", checkpoint=os.path.join(LADDER_DIR, "strong"), lr=5e-4)
            c.tokenizer.source = "model"
            # 3 seeds in about 15 minutes on 2 cores: 1,200 + 1,200 training puzzles per seed, bfloat16 compute
            # (float32 parameters and optimizer; measured: the same ground-truth accuracy, 13% faster).
            c.task.n_train = 2400
            c.model_defaults.dtype = "bfloat16"
        else:
            # Pretraining compute grows along the ladder (parameters x steps); the tokenizer keeps a move's parts
            # apart (" Nx" "f7" "+"), so a square is one token wherever it occurs. Corpus: the tiny set's games and
            # 6,000 more (launch/ladder_corpus.py). Float32 and all 4,000 training puzzles, as when the shipped
            # ladder was made: the tokenizer is trained on the corpus and the training puzzles' candidates.
            c.models.weak = model(preset="tiny-s", lr=1e-3, pretrain_steps=200)
            c.models.mid = model(preset="tiny-m", lr=7e-4, pretrain_steps=800)
            c.models.strong = model(preset="tiny-l", lr=5e-4, pretrain_steps=3000)
            c.tokenizer.split = "san"
            c.task.corpus_path = os.path.join(LADDER_DIR, "corpus.txt.gz")
            c.pretrain.update(batch_size=16, seq_len=384, lr=3e-3, warmup_steps=20)
        c.task.max_len = 512
        c.train.group_by_length = 8
        c.experiment.seeds = "0,1,2"
    elif preset == "smoke":
        c.task.n_train, c.task.n_test, c.task.max_corpus_games = 256, 64, 400
        c.tokenizer.vocab_size = 1024
        c.train.group_by_length = 4
        c.models.weak = model(preset="micro-s", lr=1e-3)
        c.models.mid = model(preset="micro-m", lr=1e-3)
        c.models.strong = model(preset="micro-l", lr=1e-3)
        c.pretrain.update(steps=20, batch_size=16, seq_len=128)
        # One sequence bucket (every prompt fits 512 tokens): at this size compiling is most of a run's time.
        c.train.update(batch_size=16, epochs=1.0, checkpoint_every=4, length_multiple=512)
        c.eval.batch_size = 32
    elif preset in ("llama1", "llama2"):
        # Real checkpoints: give their paths on the command line. Data: the lichess CSV or the generator.
        c.models.weak = model(source="hf", lr=1e-5)
        c.models.strong = model(source="hf", lr=1e-5)
        c.experiment.chains = ""
        c.tokenizer.source = "model"
        c.model_defaults.update(dtype="bfloat16", param_dtype="float32", scan_layers=True, remat_policy="full")
        c.train.update(microbatches=4, checkpoint_every=100)
        c.eval.batch_size = 32
        c.mesh.update(data=1, fsdp=-1, tensor=1)
        c.task.update(n_train=100_000, n_test=5_000)
        c.preset_family = preset
    else:
        raise ValueError(f"unknown chess preset {preset!r}: expected ladder, ladder_scratch, tiny, smoke, llama1 "
                         "or llama2")
    return c
