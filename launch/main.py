"""Run a weak-to-strong experiment from a config.

    python launch/main.py --config=configs/chess.py                      # the tiny CPU default
    python launch/main.py --config=configs/chess.py:smoke --workdir=/tmp/w2s
    python launch/main.py --config=configs/chess.py:llama2 \
        --config.models.weak.checkpoint=/ckpt/llama-2-7b-hf --config.models.strong.checkpoint=/ckpt/llama-2-13b-hf

Every stage writes into the workdir and is skipped when already done, so the same command resumes a stopped run.
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# On a CPU, XLA runs most fused element-wise work on one thread: one virtual device per core (the batch is sharded
# over them) is what uses every core. Set before jax starts; an explicit device count in XLA_FLAGS wins.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={os.cpu_count() or 1}").strip()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/chess.py", "Experiment config file[:preset].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: config.workdir or runs/<task>).")


def default_workdir(cfg) -> str:
    return cfg.workdir or os.path.join("runs", cfg.get("name", "") or cfg.task.name)


def parse_flags(argv):
    """absl flag parsing, with an unknown config key reported as one line naming the flag, not a traceback."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        key = str(e).strip("\"'")
        bad = [a for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")]
        sys.exit(f"error: {bad[0].split('=')[0] if bad else key!r}: no such config key ({key!r} is unknown)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = _CONFIG.value
    logging.getLogger().setLevel(logging.WARNING)  # libraries (orbax, absl) stay quiet
    logging.getLogger("w2s_jax").setLevel(logging.INFO)
    # Before anything touches a device: the host allocator (it must precede XLA's threads), then multi-host.
    from w2s_jax import host_memory, parallel
    try:
        retained = host_memory.retain_freed_memory(cfg.host_malloc)
    except ValueError as e:
        sys.exit(f"error: config.{e}")
    if cfg.host_malloc == "retain" and not retained:
        logging.getLogger("w2s_jax").warning("host_malloc=retain: not applied (needs glibc, before jax starts)")
    parallel.init_distributed(cfg.distributed)
    from w2s_jax import pipeline, report
    from w2s_jax.train import Preempted

    workdir = _WORKDIR.value or default_workdir(cfg)
    # Persistent compilation cache: identical programs (same model and shapes in several runs, and every rerun)
    # compile once.
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(workdir, "jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    try:
        pipeline.validate_config(cfg)
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:
        results = pipeline.Experiment(cfg, workdir).run()
    except Preempted as e:
        sys.exit(f"stopped: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; rerun the same command to resume from the last checkpoint")
    if jax.process_index() == 0:
        report.print_table(results)
        print(f"\nresults: {os.path.join(workdir, 'results.json')}, {os.path.join(workdir, 'results.md')}, "
              f"plots in {os.path.join(workdir, 'plots')}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
