"""Defaults shared by every task config. A task config starts from `get_base_config()` and fills `task`/`models`.

Lists are comma-separated strings so that they can be set from the command line:
`--config.experiment.pairs='weak->strong,mid->strong' --config.experiment.losses=xent,logconf`.
"""
import ml_collections


def model(source="pretrain", preset="", checkpoint="", lr=0.0, pretrain_steps=0, layers=0, probe_layer=None,
          probe_pooling=None, epochs=0.0):
    """One model of the ladder: pretrained here from a preset, or loaded from a checkpoint (`source='hf'`): a Hugging
    Face LLaMA directory, a .gguf file, or a shipped asset such as 'asset:smollm2' (fetched when first needed).

    lr, epochs: its finetuning's learning rate and epochs (0: train.lr, train.epochs).
    layers: keep only the first `layers` decoder layers (0: all): an early exit of a real model as a weaker model.
    probe_layer: the hidden state its linear probes read (None: `probe.layer`).
    probe_pooling: where they read it, 'last' (the prompt's last token) or 'mean' (None: `probe.pooling`).
    """
    return ml_collections.ConfigDict(dict(
        source=source, preset=preset, checkpoint=checkpoint, lr=lr, epochs=epochs, pretrain_steps=pretrain_steps,
        layers=layers, probe_layer=ml_collections.config_dict.placeholder(int) if probe_layer is None else probe_layer,
        probe_pooling=ml_collections.config_dict.placeholder(str) if probe_pooling is None else probe_pooling))


def get_base_config():
    c = ml_collections.ConfigDict()
    c.seed = 0  # the models pretrained here: initialisation and data order (experiment.seeds: the runs)
    c.workdir = ""  # --workdir wins; empty -> runs/<task>_<preset>

    c.task = ml_collections.ConfigDict()  # filled by the task config (kind, name, scoring, max_len, ...)

    # The model ladder, smallest first. Order matters for plots and for which models are "weak".
    c.models = ml_collections.ConfigDict()
    # Every model's compute and parameter dtypes, nn.scan over layers, remat ("none", "full", "dots", "dots_no_batch"),
    # attention ("own": the model's, fastest on CPU; "jax": jax.nn.dot_product_attention, cuDNN's flash on GPUs).
    c.model_defaults = ml_collections.ConfigDict(dict(
        dtype="float32", param_dtype="float32", scan_layers=False, remat_policy="none", attention="own"))

    c.tokenizer = ml_collections.ConfigDict(dict(
        source="train",  # "train": byte-level BPE trained on the task corpus; "model": the checkpoint's tokenizer
        vocab_size=2048, path="",
        # what one BPE merge may cover (tokenization.SPLIT_PATTERNS): "word" or "san" (chess moves in parts)
        split="word"))

    # Pretraining of `source='pretrain'` models (next-token prediction on the task's corpus).
    c.pretrain = ml_collections.ConfigDict(dict(
        steps=300, batch_size=32, seq_len=256, lr=3e-3, warmup_steps=30, schedule="cosine", optimizer="adamw",
        weight_decay=0.1, grad_clip=1.0, microbatches=1))

    # Finetuning on labels (ground truth or weak); defaults from the openai reference.
    c.train = ml_collections.ConfigDict(dict(
        # "finetune": every run finetunes the model with a head; "probe": every run (ground truth and students) is a
        # linear probe on the model's frozen features at its probe layer (the paper's cheapest setting).
        method="finetune",
        batch_size=32, microbatches=1, epochs=2.0, lr=5e-5, schedule="cosine", warmup_steps=0,
        optimizer="adam", weight_decay=0.0, grad_clip=0.0, head_init="zero",
        early_stopping="none",  # "none" | "weak_labels" (realistic) | "ground_truth_oracle" (the paper's oracle)
        val_frac=0.1, eval_every=50, checkpoint_every=50,
        group_by_length=0,  # >1: batches drawn from runs of that many batches sorted by length (less padding)
        length_multiple=128,  # batches pad to a multiple of this many tokens: 128 compiles few shapes, 32 pads less
        # k > 0: finetune only the top k layers (and the final norm and head) on the hidden states the frozen lower
        # layers compute once per example (w2s_jax/top_layers.py); 0: every layer. Classification tasks.
        trainable_layers=0,
    ))

    # Test predictions of `choice_lm` tasks: "rank" (the best-scoring candidate; always legal) or "greedy" (decode
    # the continuation and match it against the candidates). Supervisors' labels always come from the ranking.
    c.eval = ml_collections.ConfigDict(dict(batch_size=64, mode="rank", max_new_tokens=8))

    c.experiment = ml_collections.ConfigDict(dict(
        # Seeds of the experiment: each splits the training data, orders it and initialises the heads anew (the
        # pretrained models and the test set stay); the report gives each seed and the mean with a 95% interval.
        seeds="0",
        # Examples a direct pair's student trains on: "all" of half B, or "chain_step": as many as one step of the
        # longest chain (the slice its last step uses), so chains and direct pairs compare on equal data.
        pair_examples="all",
        # Controls beside every (supervisor, student) pair: "random_flips" trains the student on ground truth of
        # half B with random labels flipped at the supervisor's error rate there (is the gain more than denoising?).
        controls="",
        ground_truth="",  # models trained on ground truth (empty: all); supervisors and students are added
        pairs="",  # "weak->strong,..."
        losses="xent,logconf",
        chains="",  # "weak->mid->strong,..."
        chain_loss="xent",
        labels="soft",  # "soft": the supervisor's probabilities; "hard": its argmax
        # Elicitation methods beyond finetuning, run for every pair: probe (linear probe on the student's frozen
        # features, trained on weak labels), finetune_probe (probe on the weak-label-finetuned student), genft
        # (unsupervised LM finetuning on the task's texts, then naive finetuning), zero_shot, few_shot (k examples
        # labelled by the supervisor).
        methods="",
    ))
    # Linear probes on frozen features (layer -1: the last hidden state; pooling "last": at the prompt's last token,
    # "mean": averaged over its tokens), early-stopped on a val_frac split.
    c.probe = ml_collections.ConfigDict(dict(
        layer=-1, pooling="last", l2=1e-3, lr=1e-2, epochs=50, batch_size=256, patience=5, val_frac=0.1))
    # Generative finetuning (experiment.methods=genft): next-token prediction on the task's texts.
    c.genft = ml_collections.ConfigDict(dict(
        steps=100, batch_size=16, seq_len=256, lr=1e-4, warmup_steps=10, schedule="cosine", optimizer="adamw",
        weight_decay=0.0, grad_clip=1.0, microbatches=1))
    c.few_shot = ml_collections.ConfigDict(dict(k=4))  # examples in the prompt of experiment.methods=few_shot

    # Keyword arguments of each loss (w2s_jax.losses.get).
    c.losses = ml_collections.ConfigDict(dict(
        logconf=dict(aux_coef=0.5, warmup_frac=0.2, schedule="linear"),
        product=dict(alpha=1.0, beta=1.0),
        window=dict(radius=0.15),
        entropy=dict(aux_coef=0.5, warmup_frac=0.2, schedule="linear"),
    ))

    # Device mesh sizes; one may be -1: the rest of the devices (docs/SCALING.md).
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.logical_rules = ()  # empty: w2s_jax.parallel.DEFAULT_RULES
    c.distributed = ml_collections.ConfigDict(dict(
        # "auto": several processes when coordinator_address / num_processes / process_id are given (here or as W2S_*
        # environment variables) or the environment shows a launch (TPU pod, Slurm, MPI), else one; "explicit": all
        # three required; "off": one process, and an error if the settings or the environment say otherwise.
        # -1 / "" = unset.
        mode="auto", coordinator_address="", num_processes=-1, process_id=-1))
    # glibc malloc for host buffers (w2s_jax.host_memory), so CPU train steps do not page-fault their large buffers in
    # 4 KiB at a time on every step: "huge_pages" restarts the process once with glibc asking for transparent huge
    # pages (where glibc and the kernel allow; memory is still given back), "retain" keeps freed memory in the
    # process, "default" leaves glibc as it is.
    c.host_malloc = "huge_pages"
    # Virtual CPU devices on a CPU-only machine (the batch is sharded over them; 0: one per core). XLA:CPU runs most
    # fused element-wise work on one thread, so small models use every core only with one device per core, while a
    # model whose matmuls dominate (SmolLM2-135M) is faster on one device (docs/BENCHMARKS.md). An explicit
    # --xla_force_host_platform_device_count in XLA_FLAGS wins.
    c.cpu_devices = 0
    return c


def apply_ladder_preset(c, preset: str, config_name: str):
    """The presets shared by the classification-style configs (NLP tasks, reward modeling), applied to `c` after
    its task is set: the models, task sizes, tokenizer, pretraining, generative finetuning, training and eval.

      smoke   toy models pretrained here, a few hundred examples (minutes on a CPU).
      tiny    the tiny ladder weak -> mid -> strong, a few thousand examples.
      llama2  LLaMA-2 weak / strong from Hugging Face checkpoints (paths on the command line), bfloat16, scanned
              and rematerialised layers.
    """
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
        raise ValueError(f"unknown preset {preset!r} for {config_name}: expected smoke, tiny or llama2")
    return c
