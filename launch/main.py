"""Run a weak-to-strong experiment from a config.

    python launch/main.py --config=configs/chess.py                      # the chess ladder (the CPU default)
    python launch/main.py --config=configs/chess.py:smoke --workdir=/tmp/w2s
    python launch/main.py --config=configs/chess.py:llama2 \\
        --config.models.weak.checkpoint=/ckpt/llama-2-7b-hf --config.models.strong.checkpoint=/ckpt/llama-2-13b-hf
    python launch/main.py --config=configs/sciq.py:smoke --print_config  # every config key, its value and meaning

Every stage writes into the workdir and is skipped when already done, so the same command resumes a stopped run.
A mistake in the input (a flag, a config key or value, a data file, a checkpoint path, the workdir) stops the
program with one line `error: ...` and exit status 2; --debug (or W2S_DEBUG=1) shows its traceback instead.
"""
import difflib
import glob
import importlib.util
import logging
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags  # noqa: E402
from ml_collections import config_dict, config_flags  # noqa: E402

from w2s_jax.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS
DEFAULT_CONFIG = "configs/chess.py"
BASE_CONFIG = os.path.join(REPO, "configs", "base.py")
HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull")
CONFIG_HELP = """\
Every config key can be set with --config.KEY=VALUE, after --config (e.g. --config.train.lr=1e-4).
List the keys of a config, with their values and meanings, without running anything:

    python launch/main.py --config=configs/sciq.py:smoke --print_config
"""


def define_flags() -> None:
    """The flags. Without --config on the command line, the default config file is read here, with the overrides."""
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Experiment config file[:preset].", lock_config=True)
    flags.DEFINE_string("workdir", None, "Output directory (default: config.workdir or runs/<task>).")
    flags.DEFINE_bool("print_config", False, "Print every config key with its value and meaning, then exit.")
    flags.DEFINE_bool("debug", False, "Show the traceback of a mistake in the input instead of one line "
                      "(or W2S_DEBUG=1).")


def default_workdir(cfg) -> str:
    return cfg.workdir or os.path.join("runs", cfg.get("name", "") or cfg.task.name)


# ------------------------------------------------------------------------------------------- the command line
def config_spec(argv) -> str:
    """The --config value on the command line (file[:preset]), or the default."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return DEFAULT_CONFIG


def config_from_file(spec: str):
    """The config that `file[:preset]` makes, without the command line's overrides."""
    path, *preset = spec.split(":", 1)
    module_spec = importlib.util.spec_from_file_location("config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"--config={spec}: {path} has no get_config(); the configs are {', '.join(config_files())}")
    return module.get_config(*preset)


def innermost(error: BaseException) -> BaseException:
    """The exception at the bottom of a chain: the config file's own error under the flag libraries' wrappers."""
    while True:
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None:
            return error
        error = inner


def missing_key(config, key: str) -> str | None:
    """The line for a dotted `key` whose first missing part is not in `config`; None if the key exists."""
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        where = "config." + ".".join(parts[:i]) if i else "config"
        if not isinstance(node, config_dict.ConfigDict):
            return f"--config.{key}: {where} is a value ({node!r}), it has no keys"
        if part not in node:
            close = difflib.get_close_matches(part, list(node.keys()), n=1)
            hint = (f"did you mean --config.{'.'.join(parts[:i] + close + parts[i + 1:])}?" if close
                    else f"{where} has {', '.join(node.keys()) or 'no keys'}")
            return f"--config.{key}: no such config key; {hint} (--print_config lists every key)"
        node = node[part]
    return None


def unknown_key(argv) -> str | None:
    """The line for the first --config.KEY override that the config lacks; None if every key exists."""
    config = config_from_file(config_spec(argv))
    for arg in argv[1:]:
        if arg.startswith("--config."):
            message = missing_key(config, arg[len("--config."):].split("=", 1)[0])
            if message:
                return message
    return None


def expected_type(value) -> str:
    names = {bool: "True or False", int: "a whole number", float: "a number", str: "a string", tuple: "a tuple"}
    return names.get(type(value), f"a {type(value).__name__}")


def bad_value(error: flags.IllegalFlagValueError) -> str | None:
    """The line for a flag value that does not parse; None if the cause is a bug (a TypeError in a config file)."""
    match = re.match(r"flag --([^=]+)=(.*?): ", str(error), re.DOTALL)
    if not match:
        return str(error)
    name, value = match.groups()
    cause = innermost(error)
    if name == "config":  # a config file rejects its argument (an unknown preset) with a ValueError
        return f"--config={value}: {cause}" if isinstance(cause, ValueError) else None
    if name.startswith("config."):
        node = FLAGS["config"].value
        for part in name.split(".")[1:]:
            node = node[part]
        if isinstance(node, config_dict.ConfigDict):
            return f"--{name}={value}: {name} is a group of keys; set them one by one, --{name}.KEY=VALUE"
        return f"--{name}={value}: expected {expected_type(node)}, like the config's {node!r}"
    return f"--{name}={value}: {cause}"


def read_flags(parse, argv):
    """`parse()` (defining or parsing the flags), with a mistake on the command line raised as a UserError."""
    try:
        return parse()
    except OSError as e:  # ml_collections: an override of a config whose file is missing
        message = missing_config_file(config_spec(argv))
        if message is None:
            raise
        raise UserError(message) from e
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the config lacks
        message = unknown_key(argv)
        if message is None:  # no override is at fault: a bug in the config file
            raise
        raise UserError(message) from e
    except flags.IllegalFlagValueError as e:
        message = bad_value(e)
        if message is None:
            raise
        raise UserError(message) from e
    except flags.UnrecognizedFlagError as e:
        close = difflib.get_close_matches(e.flagname, ["config", "workdir", "print_config", "debug"], n=1)
        hint = f"did you mean --{close[0]}? " if close else ""
        raise UserError(f"--{e.flagname}: no such flag; {hint}the flags are --config, --config.KEY=VALUE, "
                        "--workdir, --print_config and --debug (see --help)") from e
    except config_flags.config_flags.FlagOrderError as e:
        raise UserError(f"{e}; put --config=FILE before the --config.KEY=VALUE overrides") from e
    except flags.Error as e:  # a flag without its value, ...
        missing = re.fullmatch(r"Missing value for flag (\S+)", str(e))
        raise UserError(f"{missing[1]}: no value; write {missing[1]}=VALUE" if missing else str(e)) from e


def print_help(full: bool) -> None:
    print(__doc__.strip() + "\n")
    print(FLAGS.get_help() if full else FLAGS.main_module_help() + "\n  (--helpfull: absl's flags too)")
    print()
    print(CONFIG_HELP)


def parse_flags(argv):
    """absl flag parsing, one line for each mistake; --help lists the flags and says how to see the config's keys
    (exit status 0)."""
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print_help(full="--helpfull" in argv)
        sys.exit(0)
    return read_flags(lambda: FLAGS(argv), argv)


def config_files() -> list[str]:
    paths = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
    return [os.path.relpath(p) for p in paths if "def get_config" in open(p).read()]


def missing_config_file(spec: str) -> str | None:
    if os.path.isfile(spec.split(":", 1)[0]):
        return None
    return (f"--config={spec}: no such file (relative paths start in {os.getcwd()}); the configs are "
            f"{', '.join(config_files())}")


def loaded_config():
    """The parsed config; a UserError if its file does not exist (ml_collections defers that error to first use)."""
    message = missing_config_file(config_flags.get_config_filename(FLAGS["config"]))
    if message:
        raise UserError(message)
    return FLAGS.config


# ------------------------------------------------------------------------------------------- --print_config
def key_comments(path: str, section: str = "") -> dict[str, str]:
    """{dotted key: its comment} from a config's source (configs/base.py, a task's `default_task_config`). A
    trailing comment describes the first key on its line, a block of comment lines the first key below it; a line
    `c.NAME = ...` holds the keys `NAME.*` that follow; `section` prefixes the keys before the first such line."""
    comments, block = {}, []
    with open(path) as f:
        for line in f:
            stripped = line.strip()
            if stripped.startswith("#"):
                block.append(stripped[1:].strip())
                continue
            code, _, comment = line.partition("  # ")
            top, inner = re.match(r"\s*c\.(\w+)\s*=", code), re.match(r"\s*(\w+)=", code)
            key = None
            if top:
                section = key = top.group(1)
            elif inner and section:
                key = f"{section}.{inner.group(1)}"
            text = " ".join(block + [comment.strip()]).strip()
            if key and text:
                comments[key] = text
            block = []
    return comments


def flat_items(config, prefix: str = ""):
    """(dotted key, value) for every value of a ConfigDict, in its key order."""
    for key, value in config.items():
        if isinstance(value, config_dict.ConfigDict) and len(value):
            yield from flat_items(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def print_config(cfg, spec: str) -> None:
    """The resolved config, one `key: value` a line, with the meanings from configs/base.py's comments and, for a
    key set on the command line, the config file's own value."""
    overrides = config_flags.get_override_values(FLAGS["config"])
    from_file = dict(flat_items(config_from_file(spec))) if overrides else {}
    loader = cfg.task.get("loader", "chess")
    meanings = key_comments(BASE_CONFIG)
    if loader in ("nlp", "reward"):  # their task keys are commented like base.py's
        meanings.update(key_comments(os.path.join(REPO, "w2s_jax", "data", f"{loader}.py"), section="task"))
    print(f"# --config={spec}" + (f" with {len(overrides)} override(s)" if overrides else "") +
          ". Set a key with --config.KEY=VALUE. Meanings: configs/base.py; task.*: default_task_config in "
          f"w2s_jax/data/{loader}.py")
    section = None
    for key, value in flat_items(cfg):
        top = key.split(".")[0]
        if top != section and top != key and top in meanings:
            print(f"# {top}: {meanings[top]}")
        section = top
        notes = [meanings[key]] if key in meanings else []
        if key in overrides:
            notes.append(f"set on the command line; the config file has {from_file.get(key)!r}")
        print(f"{key}: {value!r}" + (f"  # {'; '.join(notes)}" if notes else ""))


# ------------------------------------------------------------------------------------------- the run
def cpu_device_flags(xla_flags: str, devices: int, cores: int) -> str:
    """XLA_FLAGS with `devices` virtual CPU devices (config.cpu_devices; 0: one per core). An explicit count
    already in XLA_FLAGS wins. Only the CPU backend reads it, and only when it starts."""
    if devices < 0:
        raise UserError(f"config.cpu_devices={devices}: expected 0 (one per core) or a positive number")
    if "xla_force_host_platform_device_count" in xla_flags:
        return xla_flags
    return f"{xla_flags} --xla_force_host_platform_device_count={devices or cores}".strip()


def check_workdir(path: str) -> None:
    """A UserError if `path` cannot become the output directory: a file there or above it, no permission. Checked
    before the slow imports; the pipeline creates it."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "it" if existing == os.path.abspath(path) else existing
        raise UserError(f"workdir {path}: {where} is a file, not a directory; give --workdir=DIR, a new or existing "
                        "directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"workdir {path}: cannot write in {existing}; give --workdir=DIR, a directory you can "
                        "write to")


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r}: flags are written --name=value, config keys "
                        "--config.KEY=VALUE (see --help)")
    cfg = loaded_config()
    if FLAGS.print_config:
        print_config(cfg, config_flags.get_config_filename(FLAGS["config"]))
        return 0
    workdir = FLAGS.workdir or default_workdir(cfg)
    check_workdir(workdir)
    logging.getLogger().setLevel(logging.WARNING)  # libraries (orbax, absl) stay quiet
    logging.getLogger("w2s_jax").setLevel(logging.INFO)
    # Before anything touches a device: the host allocator (huge pages restart the process, so first), the CPU
    # devices (both must precede XLA's start), then multi-host.
    from w2s_jax import host_memory, parallel
    try:
        in_force = host_memory.set_host_malloc(cfg.host_malloc)
    except ValueError as e:
        raise UserError(f"config.{e}") from e
    if cfg.host_malloc == "retain" and in_force != host_memory.IN_FORCE["retain"]:
        logging.getLogger("w2s_jax").warning("host_malloc=retain: not applied (needs glibc, before jax starts)")
    elif cfg.host_malloc == "huge_pages" and in_force != host_memory.IN_FORCE["huge_pages"]:
        logging.getLogger("w2s_jax").info(f"host_malloc=huge_pages: not applied, as "
                                          f"{host_memory.huge_pages_unavailable()}; glibc's default allocator in use")
    os.environ["XLA_FLAGS"] = cpu_device_flags(os.environ.get("XLA_FLAGS", ""), cfg.get("cpu_devices", 0),
                                               os.cpu_count() or 1)
    parallel.init_distributed(cfg.distributed)
    from w2s_jax import pipeline, report
    from w2s_jax.train import Preempted

    validate(cfg)
    # Persistent compilation cache: identical programs (same model and shapes in several runs, and every rerun)
    # compile once.
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(workdir, "jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
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


def wants_traceback(argv) -> bool:
    """--debug or W2S_DEBUG=1, read from argv itself: a mistake can stop the program before the flags are parsed."""
    return os.environ.get("W2S_DEBUG", "0") not in ("", "0") or any(a in ("--debug", "--debug=true") for a in argv)


def validate(cfg) -> None:
    """`pipeline.validate_config`, its problems as one UserError line (it lists them one a line)."""
    from w2s_jax import pipeline
    try:
        pipeline.validate_config(cfg)
    except ValueError as e:
        raise UserError(str(e).replace(":\n  - ", ": ", 1).replace("\n  - ", "; ")) from e


def run(argv) -> int:
    """main() through absl; a UserError ends the program with one line on stderr and exit status 2."""
    try:
        read_flags(define_flags, argv)
        app.run(main, argv, flags_parser=parse_flags)
    except UserError as e:
        if wants_traceback(argv):
            raise
        print("error: " + " ".join(line.strip() for line in str(e).strip().splitlines()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv))
