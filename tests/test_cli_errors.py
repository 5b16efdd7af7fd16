"""launch/main.py on bad input: one line `error: ...` on stderr, exit status 2 and no traceback (--debug: the
traceback); --help and --print_config exit 0.

Every case runs main.py in a subprocess. They all stop before any training or compilation, and they run in
parallel, once for the module.
"""
import concurrent.futures
import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCIQ_ROW = {"question": "What do plants make?", "correct_answer": "sugar", "distractor1": "helium",
            "distractor2": "iron", "distractor3": "salt"}
SCIQ_COLUMNS = "question, correct_answer, distractor1, distractor2, distractor3"
CONFIGS = ", ".join(os.path.relpath(p, REPO) for p in sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
                    if "def get_config" in open(p).read())
SMOKE = "--config=configs/chess.py:smoke"
SCIQ = "--config=configs/sciq.py:smoke"
NO_HUB = ("task 'sciq': the Hugging Face Hub (http://127.0.0.1:9) cannot be reached and allenai/sciq is not in the "
          "datasets cache; give local files: --config.task.data_files=train=sciq_train.jsonl,test=sciq_test.jsonl "
          f"(json, jsonl, csv or parquet) with columns {SCIQ_COLUMNS}; `python -m w2s_jax.data.nlp sciq` writes them "
          "from the Hub (docs/CLI.md)")

# name: (arguments, extra environment, the last line of stderr). {tmp} is the module's folder of inputs.
CASES = {
    # flags and config files (issue 16's table first)
    "typo_in_key": (["--config.train.lrr=1e-5"], {},
                    "--config.train.lrr: no such config key; did you mean --config.train.lr? "
                    "(--print_config lists every key)"),
    "typo_in_section": ([SMOKE, "--config.trian.lr=1e-5"], {},
                        "--config.trian.lr: no such config key; did you mean --config.train.lr? "
                        "(--print_config lists every key)"),
    "float_not_a_number": (["--config.train.lr=abc"], {},
                           "--config.train.lr=abc: expected a number, like the config's 5e-05"),
    "int_not_whole": (["--config.train.batch_size=1.5"], {},
                      "--config.train.batch_size=1.5: expected a whole number, like the config's 32"),
    "group_given_a_value": ([SMOKE, "--config.train=3"], {},
                            "--config.train=3: config.train is a group of keys; set them one by one, "
                            "--config.train.KEY=VALUE"),
    "key_without_value": ([SMOKE, "--config.train.lr"], {},
                          "--config.train.lr: no value; write --config.train.lr=VALUE"),
    "override_before_config": (["--config.train.lr=1e-4", SMOKE], {},
                               "Found --config.train.lr=1e-4 in argv before a value for --config was specified; "
                               "put --config=FILE before the --config.KEY=VALUE overrides"),
    "no_config_file": (["--config=configs/nope.py"], {},
                       f"--config=configs/nope.py: no such file (relative paths start in {REPO}); the configs are "
                       f"{CONFIGS}"),
    "unknown_preset": (["--config=configs/chess.py:bogus"], {},
                       "--config=configs/chess.py:bogus: unknown chess preset 'bogus': expected ladder, "
                       "ladder_scratch, tiny, smoke, llama1 or llama2"),
    "unknown_nlp_preset": (["--config=configs/sciq.py:bogus"], {},
                           "--config=configs/sciq.py:bogus: unknown preset 'bogus' for sciq: expected smoke, tiny or "
                           "llama2"),
    "unknown_flag": (["--workdri=/tmp/x"], {},
                     "--workdri: no such flag; did you mean --workdir? the flags are --config, --config.KEY=VALUE, "
                     "--workdir, --print_config and --debug (see --help)"),
    "positional_argument": ([SMOKE, "extra"], {},
                            "unexpected argument 'extra': flags are written --name=value, config keys "
                            "--config.KEY=VALUE (see --help)"),
    # the config's values (pipeline.validate_config), multi-process settings, the workdir
    "bad_eval_mode_and_labels": ([SMOKE, "--config.eval.mode=bogus", "--config.experiment.labels=x"], {},
                                 "invalid config: eval.mode='bogus': expected 'rank' or 'greedy'; "
                                 "experiment.labels='x': expected 'soft' or 'hard'"),
    "bad_model_defaults": (
        [SMOKE, "--config.model_defaults.remat_policy=some", "--config.model_defaults.attention=flash"], {},
        "invalid config: model_defaults.remat_policy='some': expected one of ['none', 'full', 'dots', "
        "'dots_no_batch']; model_defaults.attention='flash': expected one of ['own', 'jax']"),
    "checkpoint_without_config_json": (
        [SMOKE, "--config.models.weak.source=hf", "--config.models.weak.checkpoint={tmp}/empty_dir",
         "--config.tokenizer.source=model"], {},
        "invalid config: models.weak.checkpoint='{tmp}/empty_dir': no config.json there (expected a Hugging Face "
        "LLaMA directory or a .gguf file)"),
    "missing_gguf": ([SMOKE, "--config.models.weak.source=hf", "--config.models.weak.checkpoint={tmp}/nope.gguf",
                      "--config.tokenizer.source=model"], {},
                     "invalid config: models.weak.checkpoint='{tmp}/nope.gguf': no such GGUF file"),
    "negative_batch_size": ([SMOKE, "--config.train.batch_size=-3"], {},
                            "invalid config: train.batch_size=-3: expected a positive integer"),
    "probe_on_chess": ([SMOKE, "--config.experiment.methods=probe"], {},
                       "invalid config: experiment.methods: 'probe' needs a fixed set of classes, but task.scoring="
                       "'choice_lm' scores a variable list of candidates (chess: the legal moves), so a linear head "
                       "over their indices means nothing"),
    "bad_probe_pooling": ([SMOKE, "--config.probe.pooling=max", "--config.models.weak.probe_pooling=first"], {},
                          "invalid config: probe.pooling='max': expected one of ['last', 'mean']; "
                          "models.weak.probe_pooling='first': expected one of ['last', 'mean']"),
    "unknown_model_in_chain": ([SMOKE, "--config.experiment.chains=weak->huge->strong"], {},
                               "invalid config: experiment.chains: unknown model 'huge' in 'weak->huge->strong'; "
                               "models are ['mid', 'strong', 'weak']"),
    "hf_model_without_checkpoint": ([SMOKE, "--config.models.weak.source=hf"], {},
                                    "invalid config: models.weak.checkpoint is empty: give the path of a Hugging "
                                    "Face LLaMA directory (--config.models.weak.checkpoint=/path/to/llama); "
                                    "tokenizer.source='train' cannot serve HF checkpoints; use "
                                    "tokenizer.source='model'"),
    "unknown_loss": ([SMOKE, "--config.experiment.losses=xent,nope"], {},
                     "invalid config: experiment.losses / losses.nope: unknown loss 'nope'; valid: xent, logconf, "
                     "product, window, entropy"),
    "unknown_method": ([SMOKE, "--config.experiment.methods=zero_shot,magic"], {},
                       "invalid config: experiment.methods: unknown method 'magic'; valid methods are ['probe', "
                       "'finetune_probe', 'genft', 'zero_shot', 'few_shot']"),
    "bad_host_malloc": ([SMOKE, "--config.host_malloc=sometimes"], {},
                        "config.host_malloc='sometimes': expected one of 'default', 'retain', 'huge_pages'"),
    "bad_seeds": ([SMOKE, "--config.experiment.seeds=0,zero"], {},
                  "invalid config: experiment.seeds='0,zero': expected comma-separated integers such as '0,1,2'"),
    "bad_distributed_mode": ([SMOKE, "--config.distributed.mode=bogus"], {},
                             "distributed.mode='bogus' is not one of 'auto', 'explicit', 'off'"),
    "workdir_is_a_file": ([SMOKE, "--workdir={tmp}/a_file"], {},
                          "workdir {tmp}/a_file: it is a file, not a directory; give --workdir=DIR, a new or "
                          "existing directory"),
    "workdir_under_a_file": ([SMOKE, "--workdir={tmp}/a_file/run"], {},
                             "workdir {tmp}/a_file/run: {tmp}/a_file is a file, not a directory; give --workdir=DIR, "
                             "a new or existing directory"),
    # config.cpu_devices reaches XLA (no device count in XLA_FLAGS): the mesh sees 5 devices on this 2-core machine
    "cpu_devices_reach_xla": ([SMOKE, "--config.cpu_devices=5", "--config.mesh.fsdp=3"], {"XLA_FLAGS": ""},
                              "mesh config {{'data': 1, 'fsdp': 3, 'tensor': 1}}: sizes multiply to 3 but there are "
                              "5 devices"),
    "xla_flags_count_wins": ([SMOKE, "--config.cpu_devices=5", "--config.mesh.fsdp=2"],
                             {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"},
                             "mesh config {{'data': 1, 'fsdp': 2, 'tensor': 1}}: sizes multiply to 2 but there are "
                             "3 devices"),
    "negative_cpu_devices": ([SMOKE, "--config.cpu_devices=-1"], {},
                             "config.cpu_devices=-1: expected 0 (one per core) or a positive number"),
    # data
    "no_hub": ([SCIQ], {}, NO_HUB),
    "no_data_file": ([SCIQ, "--config.task.data_files=/nonexistent.jsonl"], {},
                     f"data_files: no file matches '/nonexistent.jsonl' (relative paths start in {REPO}); give "
                     "--config.task.data_files=PATH or train=PATH,test=PATH"),
    "malformed_jsonl_row": ([SCIQ, "--config.task.data_files=train={tmp}/bad.jsonl,test={tmp}/good.jsonl"], {},
                            "{tmp}/bad.jsonl:3: not valid JSON (Expecting ',' delimiter at column 45); each line "
                            "must be one JSON object"),
}
# name: (arguments, extra environment); checked one by one below
OTHER_RUNS = {
    "help": (["--help"], {}),
    "print_config": ([SCIQ, "--config.train.lr=1e-4", "--print_config"], {}),
    "debug_flag": (["--config.train.lrr=1e-5", "--debug"], {}),
    "debug_environment": (["--config.train.lrr=1e-5"], {"W2S_DEBUG": "1"}),
}


def write_inputs(tmp):
    rows = [dict(SCIQ_ROW, question=f"Question {i}?") for i in range(8)]
    with open(tmp / "good.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    with open(tmp / "bad.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows[:2])
        f.write('{"question": "Q?", "correct_answer": "sugar"\n')  # no closing brace
        f.writelines(json.dumps(row) + "\n" for row in rows[2:])
    (tmp / "a_file").write_text("not a directory")
    (tmp / "empty_dir").mkdir()


def run_main(tmp, name, args, env):
    """main.py with a workdir of its own (a later --workdir wins), on the CPU, and a Hub that refuses at once."""
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "W2S_"))}
    base_env.update(JAX_PLATFORMS="cpu", HF_HOME=str(tmp / "hf_home"), HF_ENDPOINT="http://127.0.0.1:9", **env)
    args = [f"--workdir={tmp}/runs/{name}"] + [a.format(tmp=tmp) for a in args]
    return subprocess.run([sys.executable, os.path.join(REPO, "launch", "main.py"), *args], cwd=REPO,
                          env=base_env, capture_output=True, text=True, timeout=300)


def run_every_case(tmp):
    write_inputs(tmp)
    every = {**{name: case[:2] for name, case in CASES.items()}, **OTHER_RUNS}
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run_main, tmp, name, args, env) for name, (args, env) in every.items()}
        procs = {name: future.result() for name, future in futures.items()}
    return {name: [p.returncode, p.stdout, p.stderr] for name, p in procs.items()}


@pytest.fixture(scope="module")
def runs(once_per_session):
    tmp, procs = once_per_session("cli", run_every_case)
    return tmp, {name: subprocess.CompletedProcess(name, *p) for name, p in procs.items()}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_ends_with_one_line(runs, name):
    tmp, procs = runs
    proc, expected = procs[name], "error: " + CASES[name][2].format(tmp=tmp)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == expected
    assert proc.returncode == 2


def test_help_exits_0_and_says_how_to_list_the_config_keys(runs):
    proc = runs[1]["help"]
    assert proc.returncode == 0, proc.stderr
    assert "--config.KEY=VALUE" in proc.stdout and "--print_config" in proc.stdout and "--workdir" in proc.stdout


def test_print_config_shows_values_meanings_and_overrides(runs):
    proc = runs[1]["print_config"]
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# --config=configs/sciq.py:smoke with 1 override(s).")
    assert "train.lr: 0.0001  # set on the command line; the config file has 5e-05" in lines
    assert "train.batch_size: 16" in lines
    assert "task.data_files: ''  # \"\" | \"PATH\" | \"train=PATH,test=PATH\" (globs allowed)" in lines
    assert any(line.startswith("train.early_stopping: 'none'  # \"none\" | \"weak_labels\"") for line in lines)
    assert "# train: Finetuning on labels (ground truth or weak); defaults from the openai reference." in lines
    assert not (runs[0] / "runs" / "print_config").exists()  # nothing ran


@pytest.mark.parametrize("name", ["debug_flag", "debug_environment"])
def test_debug_shows_the_traceback(runs, name):
    proc = runs[1][name]
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "w2s_jax.errors.UserError: --config.train.lrr: no such config key; did you mean --config.train.lr? "
        "(--print_config lists every key)")
