"""NLP binary-classification tasks (Burns et al., 2023) as Examples (see docs/CONTRACTS.md).

Every task turns one dataset row into `(text, label)` with `label` in {0, 1}. The paper's five formatters
(sciq, boolq, amazon_polarity, cosmos_qa, anthropic_hh) follow openai/weak-to-strong; the others follow the
paper's dataset list, most of them built "the sciq way": a coin flip shows either the right answer (label 1) or
a random wrong one (label 0).

Loading order, for the train and the test split independently (`load_nlp_task`):
  1. rows: the split's rows (Hugging Face `datasets` or local files) visited in a permutation drawn from
     `np.random.default_rng(seed)`;
  2. format: the task's formatter, with one `random.Random(seed)` shared by the rows in visiting order (the coin
     flips); rows without a usable label (hidden test labels such as -1 or "") are skipped;
  3. drop: empty texts, and texts longer than `max_chars` characters (0 = no limit);
  4. balance (if `balance`): undersample to 50/50. Each class keeps its first ceil(n/2) examples in visiting
     order (or, if the rows run out first, as many as the smaller class has); they stay in visiting order;
  5. take the first n (`n_train` / `n_test`; 0 = all).
The same seed gives byte-identical Examples. Ids are `"{name}/{train|test}/{source_index}"`, where
`source_index` is the row's index in its source split (or file), so an id names the same source row under every
seed (the coin flip, and so the text, may differ). Token-length filtering is done later by the pipeline, which
drops over-long examples (a few more may go there, so classes can end up off by a handful).

Data sources (`data_files`, else `hf_path`/`hf_name` with `train_split`/`test_split`):
  - `""`: `datasets.load_dataset(hf_path, hf_name, split=...)` (needs the Hub or a filled HF cache);
  - `"train=PATH,test=PATH"`: local files for each split;
  - `"PATH"`: one local file (or glob); its rows are split once with the fixed seed `SPLIT_SEED` (not the run's
    seed, so the test pool never moves between runs): a `test_fraction` share is the test split.
  Files are json, jsonl, csv or parquet (optionally .gz/.bz2/.xz/.zst compressed) with the dataset's own columns
  (`NlpTask.columns`). `python -m w2s_jax.data.nlp TASK [DIR]` writes a task's two splits as such files, from the
  Hub, for a machine without it.

Bad input (a missing file, a malformed row, an unreachable Hub) raises `UserError` naming the file and line or
saying what to set instead.
"""
from __future__ import annotations

import bz2
import dataclasses
import functools
import glob
import gzip
import itertools
import json
import logging
import lzma
import math
import os
import random
import sys
from typing import Any, Callable, Iterable, Iterator, Optional

import datasets
import ml_collections
import numpy as np

from w2s_jax.errors import MissingFile, UserError

log = logging.getLogger(__name__)

SPLIT_SEED = 0
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # .zst: not in the standard library

Formatter = Callable[[dict, random.Random], Optional[tuple[str, int]]]


# ----------------------------------------------------------------------------------------------------------------
# Small helpers used by the formatters.


def as_binary(value: Any) -> Optional[int]:
    """0/1 from a bool, 0/1 number or "0"/"1"/"true"/"false" string; None for anything else (hidden labels)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and value in (0, 1):
        return int(value)
    if isinstance(value, str):
        return {"0": 0, "1": 1, "false": 0, "true": 1}.get(value.strip().lower())
    return None


def as_index(value: Any, size: int, offset: int = 0) -> Optional[int]:
    """A choice index from an int or a digit string (`offset` for 1-based labels); None if out of range."""
    try:
        index = int(value) - offset
    except (TypeError, ValueError):
        return None
    return index if 0 <= index < size else None


def answer_key_index(row: dict) -> Optional[int]:
    """The index of `answerKey` among the `choices` letters (openbookqa, quartz); None if it is not one of them."""
    letters = list(row["choices"]["label"])
    return letters.index(row["answerKey"]) if row["answerKey"] in letters else None


def coin_flip(rng: random.Random, right: str, wrong: list[str]) -> Optional[tuple[str, int]]:
    """The sciq construction: label 1 shows the right answer, label 0 a random wrong one (None: no wrong one)."""
    wrong = [w for w in wrong if w and w != right]
    if not wrong:
        return None
    if rng.random() < 0.5:
        return right, 1
    return rng.choice(wrong), 0


def coin_flip_choice(rng: random.Random, choices: list[str], right_index: Optional[int]) -> Optional[tuple[str, int]]:
    """`coin_flip` over multiple choices: the right one or a random other one (None: no usable `right_index`)."""
    if right_index is None:
        return None
    return coin_flip(rng, choices[right_index], [c for i, c in enumerate(choices) if i != right_index])


def answer_text(template: str, row: dict, picked: Optional[tuple[str, int]], **fields) -> Optional[tuple[str, int]]:
    """(text, label) for a coin-flipped `picked = (answer, label)`: `template` filled (str.format) with the row's
    columns, `fields` and `answer`; None if nothing was picked."""
    if picked is None:
        return None
    answer, label = picked
    return template.format_map({**row, **fields, "answer": answer}), label


def labelled_text(template: str, label_column: str = "label") -> Formatter:
    """A formatter for rows that carry their own binary label: `template` filled (str.format) with the row's
    columns, and the label read from `label_column` (rows with a hidden label give None)."""
    def format_row(row, rng):
        label = as_binary(row[label_column])
        if label is None:
            return None
        return template.format_map(row), label
    return format_row


# ----------------------------------------------------------------------------------------------------------------
# Formatters: row -> (text, label) or None (row unusable). Paper-identical ones first.


def format_sciq(row, rng):
    picked = coin_flip(rng, row["correct_answer"], [row["distractor1"], row["distractor2"], row["distractor3"]])
    return answer_text("Q: {question} A: {answer}", row, picked)


format_boolq = labelled_text("Passage: {passage}\nQuestion: {question}", label_column="answer")
format_amazon_polarity = labelled_text("{title} {content}")


def format_cosmos_qa(row, rng):
    """Reference rule: a right answer "None of the above choices ." is always shown wrong (label 0)."""
    answers = [row[f"answer{i}"] for i in range(4)]
    right_index = as_index(row["label"], 4)
    if right_index is None:
        return None
    right = answers[right_index]
    wrong = [a for i, a in enumerate(answers) if i != right_index and a and a != right]
    if "None of the above choices ." in right:
        picked = (rng.choice(wrong), 0) if wrong else None
    else:
        picked = coin_flip(rng, right, wrong)
    return answer_text("Context: {context}\nQuestion: {question}\nAnswer: {answer}", row, picked)


def format_anthropic_hh(row, rng):
    """Reference construction: ONE transcript, the chosen (label 1) or the rejected one. Sits at chance (issue #34)."""
    if rng.random() < 0.5:
        return row["chosen"], 1
    return row["rejected"], 0


format_sentence = labelled_text("{sentence}")   # sst2, cola: the sentence itself
format_twitter_sentiment = labelled_text("{text}")


def format_piqa(row, rng):
    picked = coin_flip_choice(rng, [row["sol1"], row["sol2"]], as_index(row["label"], 2))
    return answer_text("Q: {goal} A: {answer}", row, picked)


def format_hellaswag(row, rng):
    endings = list(row["endings"])
    picked = coin_flip_choice(rng, endings, as_index(row["label"], len(endings)))
    return answer_text('Context:\n{ctx}\n\nContinuations:\n\n{listed}\n\nQ: Is "{answer}" the best continuation?',
                       row, picked, listed="\n".join(endings))


def format_social_i_qa(row, rng):
    answers = [row["answerA"], row["answerB"], row["answerC"]]
    picked = coin_flip_choice(rng, answers, as_index(row["label"], 3, offset=1))
    template = 'Context:\n{context}\n\nQuestion: "{question}"\n\nChoices:\n{listed}\n\nIs the answer "{answer}"?'
    return answer_text(template, row, picked, listed="\n".join(answers))


def format_openbookqa(row, rng):
    """Shows the answer's TEXT in both branches (EleutherAI's version shows the key letter when right)."""
    letters, texts = list(row["choices"]["label"]), list(row["choices"]["text"])
    picked = coin_flip_choice(rng, texts, answer_key_index(row))
    listed = "\n".join(f"{letter}) {text}" for letter, text in zip(letters, texts))
    return answer_text("Q: {question_stem}\n\nChoices:\n{listed}\n\nAnswer: {answer}", row, picked, listed=listed)


def format_quartz(row, rng):
    picked = coin_flip_choice(rng, list(row["choices"]["text"]), answer_key_index(row))
    return answer_text('Passage:\n{para}\n\nQ: "{question}" Is the answer "{answer}"?', row, picked)


def format_dream(row, rng):
    """The right answer is the `answer` column's text; the wrong ones are the other `choice`s."""
    picked = coin_flip(rng, row["answer"], [c for c in row["choice"] if c != row["answer"]])
    return answer_text("{dialogue}\n\nQ: {question} A: {answer}", row, picked, dialogue="\n".join(row["dialogue"]))


def format_quail(row, rng):
    answers = list(row["answers"])
    picked = coin_flip_choice(rng, answers, as_index(row["correct_answer_id"], len(answers)))
    return answer_text('Passage:\n\n{context}\n\nQ: "{question}" Is the answer "{answer}"?', row, picked)


format_multirc = labelled_text('Passage:\n\n{paragraph}\n\nQ: "{question}" Is the answer "{answer}"?')


def format_anli(row, rng):
    """Label 1 = entailment (ANLI label 0); neutral and contradiction are label 0."""
    nli_label = as_index(row["label"], 3)
    if nli_label is None:
        return None
    text = (f"Premise: {row['premise']}\nHypothesis: {row['hypothesis']}\n\n"
            "Does the premise entail the hypothesis?")
    return text, int(nli_label == 0)


format_paws = labelled_text("Sent 1: {sentence1}\nSent 2: {sentence2}\n\n"
                            "Q: Are these sentences semantically equivalent?")
format_wic = labelled_text('Sentence 1:\n{sentence1}\n\nSentence 2:\n{sentence2}\n\n'
                           'Q: Does "{word}" have the same meaning in the above sentences?')
format_mc_taco = labelled_text("{sentence}\n\nGiven the above, {question} Is the answer {answer}?")
format_ethics_deontology = labelled_text("Q: Is the following a morally valid excuse?\n\n{scenario}\n\n{excuse}\n\nA:")
format_ethics_justice = labelled_text("Q: Does this statement exemplify justice?\n\n{scenario}\n\nA:")
format_ethics_virtue = labelled_text("Q: Does this behavior match the adjective that follows?\n\n{scenario}\n\nA:")


def format_ethics_utilitarianism(row, rng):
    """`baseline` is the more pleasant scenario. Both are listed in random order; label 1 if the answer is right."""
    label = int(rng.random() < 0.5)
    options = [row["baseline"], row["less_pleasant"]]
    rng.shuffle(options)
    right = options.index(row["baseline"])
    shown = right if label else 1 - right
    return f"Which is more pleasant?\n1) {options[0]}\n2) {options[1]} A: {shown + 1}", label


# ----------------------------------------------------------------------------------------------------------------
# Registry.


@dataclasses.dataclass(frozen=True)
class NlpTask:
    """Where a task's data lives on the Hub, which columns its formatter reads, and the formatter."""
    hf_path: str
    hf_name: str
    train_split: str
    test_split: str
    columns: tuple[str, ...]
    format: Formatter


_ETHICS = "hendrycks/ethics"
_GLUE = "nyu-mll/glue"
_SUPER_GLUE = "aps/super_glue"

TASKS: dict[str, NlpTask] = {
    # Paper-identical (openai/weak-to-strong). Test = the HF test split, or validation where test has no labels.
    "sciq": NlpTask("allenai/sciq", "", "train", "test",
                    ("question", "correct_answer", "distractor1", "distractor2", "distractor3"), format_sciq),
    "boolq": NlpTask("google/boolq", "", "train", "validation", ("passage", "question", "answer"), format_boolq),
    "amazon_polarity": NlpTask("fancyzhx/amazon_polarity", "", "train", "test", ("title", "content", "label"),
                               format_amazon_polarity),
    "cosmos_qa": NlpTask("allenai/cosmos_qa", "", "train", "validation",
                         ("context", "question", "answer0", "answer1", "answer2", "answer3", "label"),
                         format_cosmos_qa),
    "anthropic_hh": NlpTask("Anthropic/hh-rlhf", "", "train", "test", ("chosen", "rejected"), format_anthropic_hh),
    # The rest of the paper's list.
    "sst2": NlpTask(_GLUE, "sst2", "train", "validation", ("sentence", "label"), format_sentence),
    "cola": NlpTask(_GLUE, "cola", "train", "validation", ("sentence", "label"), format_sentence),
    "twitter_sentiment": NlpTask("EleutherAI/twitter-sentiment", "", "train", "test", ("text", "label"),
                                 format_twitter_sentiment),
    "piqa": NlpTask("ybisk/piqa", "", "train", "validation", ("goal", "sol1", "sol2", "label"), format_piqa),
    "hellaswag": NlpTask("Rowan/hellaswag", "", "train", "validation", ("ctx", "endings", "label"),
                         format_hellaswag),
    "social_i_qa": NlpTask("allenai/social_i_qa", "", "train", "validation",
                           ("context", "question", "answerA", "answerB", "answerC", "label"), format_social_i_qa),
    "openbookqa": NlpTask("allenai/openbookqa", "main", "train", "test", ("question_stem", "choices", "answerKey"),
                          format_openbookqa),
    "quartz": NlpTask("allenai/quartz", "", "train", "test", ("para", "question", "choices", "answerKey"),
                      format_quartz),
    "dream": NlpTask("dataset-org/dream", "", "train", "test", ("dialogue", "question", "choice", "answer"),
                     format_dream),
    "quail": NlpTask("textmachinelab/quail", "", "train", "validation",
                     ("context", "question", "answers", "correct_answer_id"), format_quail),
    "multirc": NlpTask(_SUPER_GLUE, "multirc", "train", "validation", ("paragraph", "question", "answer", "label"),
                       format_multirc),
    "anli_r2": NlpTask("facebook/anli", "", "train_r2", "test_r2", ("premise", "hypothesis", "label"), format_anli),
    "paws": NlpTask("google-research-datasets/paws", "labeled_final", "train", "test",
                    ("sentence1", "sentence2", "label"), format_paws),
    "wic": NlpTask(_SUPER_GLUE, "wic", "train", "validation", ("word", "sentence1", "sentence2", "label"),
                   format_wic),
    # mc_taco's test split is the larger one, so it trains on test and evaluates on validation (as EleutherAI).
    "mc_taco": NlpTask("CogComp/mc_taco", "", "test", "validation", ("sentence", "question", "answer", "label"),
                       format_mc_taco),
    "ethics_deontology": NlpTask(_ETHICS, "deontology", "train", "test", ("scenario", "excuse", "label"),
                                 format_ethics_deontology),
    "ethics_justice": NlpTask(_ETHICS, "justice", "train", "test", ("scenario", "label"), format_ethics_justice),
    "ethics_virtue": NlpTask(_ETHICS, "virtue", "train", "test", ("scenario", "label"), format_ethics_virtue),
    "ethics_utilitarianism": NlpTask(_ETHICS, "utilitarianism", "train", "test", ("baseline", "less_pleasant"),
                                     format_ethics_utilitarianism),
}


def get_task(name: str) -> NlpTask:
    if name not in TASKS:
        raise UserError(f"unknown NLP task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def default_task_config(name: str) -> ml_collections.ConfigDict:
    """The task's config: its Hub source and splits, and the loading options (see the module docstring)."""
    task = get_task(name)
    return ml_collections.ConfigDict(dict(
        name=name,
        loader="nlp",
        hf_path=task.hf_path,
        hf_name=task.hf_name,          # "" = none
        data_files="",                 # "" | "PATH" | "train=PATH,test=PATH" (globs allowed)
        test_fraction=0.2,             # share of a single data file that becomes the test split
        train_split=task.train_split,
        test_split=task.test_split,
        n_train=20000,                 # 0 = all
        n_test=10000,                  # 0 = all
        balance=True,
        max_chars=0,                   # 0 = no limit
        label_words=("0", "1"),
        seed=0,
        scoring="classify",
    ))


def with_defaults(task_cfg, default_config: Callable[[str], ml_collections.ConfigDict]) -> ml_collections.ConfigDict:
    """The task's default config overridden by every key the caller set (a ConfigDict or a plain dict)."""
    given = task_cfg.to_dict() if hasattr(task_cfg, "to_dict") else dict(task_cfg)
    if "name" not in given:
        raise UserError("task config has no 'name'")
    merged = default_config(given["name"])
    for key, value in given.items():
        merged[key] = value
    return merged


# ----------------------------------------------------------------------------------------------------------------
# Sources: rows of the train and test splits, from local files or the Hub.


@dataclasses.dataclass
class SourceSplit:
    """Rows of one split. `source_indices[j]` is the index of `rows[j]` in its source (file or Hub split)."""
    rows: datasets.Dataset
    source_indices: np.ndarray
    origin: str   # for messages: the file(s) or "hf_path/hf_name:split"
    split: str    # recorded in each Example's meta


def parse_data_files(spec: str) -> Optional[dict[str, str]]:
    """`""` -> None; `"PATH"` -> {"all": PATH}; `"train=PATH,test=PATH"` -> {"train": .., "test": ..}."""
    spec = spec.strip()
    if not spec:
        return None
    if "=" not in spec:
        return {"all": spec}
    parts = dict(part.split("=", 1) for part in spec.split(",") if part.strip())
    parts = {key.strip(): value.strip() for key, value in parts.items()}
    if set(parts) != {"train", "test"}:
        raise UserError(f"data_files={spec!r}: expected 'PATH' or 'train=PATH,test=PATH', got keys {sorted(parts)}")
    return parts


def _builder_for(path: str) -> str:
    stem = path
    for suffix in _COMPRESSIONS:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    extension = os.path.splitext(stem)[1].lower()
    if extension not in _BUILDERS:
        raise UserError(f"data_files: {path!r} has an unsupported extension; use one of {sorted(_BUILDERS)}")
    return _BUILDERS[extension]


def load_files(pattern: str) -> tuple[datasets.Dataset, str]:
    """All rows of the files matching `pattern` (sorted paths, concatenated), read with `datasets` offline."""
    paths = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not paths:
        raise MissingFile(f"data_files: no file matches {pattern!r} (relative paths start in {os.getcwd()}); "
                              "give --config.task.data_files=PATH or train=PATH,test=PATH")
    builders = {_builder_for(path) for path in paths}
    if len(builders) != 1:
        raise UserError(f"data_files: {pattern!r} mixes file formats {sorted(builders)}")
    builder = builders.pop()
    for path in paths:
        if os.path.getsize(path) == 0:  # datasets fails on these with a bare StopIteration
            raise UserError(f"{path}: empty file; a data file needs rows with the task's columns")
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # not its log of a bad row: our error names it
    try:
        rows = datasets.load_dataset(builder, data_files=paths, split="train")
    except (datasets.exceptions.DatasetGenerationError, ValueError) as e:
        raise UserError(unreadable(paths, builder, e)) from e
    finally:
        datasets.logging.set_verbosity(verbosity)
    return rows, ", ".join(paths)


def unreadable(paths: list[str], builder: str, error: Exception) -> str:
    """Why `datasets` could not read the files: the first bad row, found by reading them here, else its reason."""
    for path in paths:
        bad_row = first_bad_json_row(path) if builder == "json" else None
        if bad_row:
            return bad_row
    while error.__cause__ or error.__context__:
        error = error.__cause__ or error.__context__
    return f"data_files: cannot read {', '.join(paths)} as {builder}: {str(error).strip()}"


def first_bad_json_row(path: str) -> Optional[str]:
    """'PATH:LINE: why' for the first line of a JSON Lines file that is not a JSON object; for a file that is one
    JSON document (datasets reads those too), where it stops parsing. None if neither is wrong (or .zst)."""
    suffix = os.path.splitext(path)[1]
    if suffix == ".zst":
        return None
    with _OPENERS.get(suffix, open)(path, "rb") as f:
        first = True
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError
                if first:  # not JSON Lines
                    return _json_document_error(path)
                # the column within the line, its end for an error after the last character
                why = (f"{e.msg} at column {min(e.pos, len(line.rstrip())) + 1}" if isinstance(e, json.JSONDecodeError)
                       else "not UTF-8")
                return f"{path}:{number}: not valid JSON ({why}); each line must be one JSON object"
            if not isinstance(row, dict):
                return f"{path}:{number}: a JSON {type(row).__name__}, not an object {{\"column\": value, ...}}"
            first = False
    return None


def _json_document_error(path: str) -> Optional[str]:
    try:
        with _OPENERS.get(os.path.splitext(path)[1], open)(path, "rb") as f:
            json.load(f)
    except json.JSONDecodeError as e:
        return f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
    except ValueError:
        return f"{path}: not UTF-8 text"
    return None


def check_columns(rows: datasets.Dataset, columns: Iterable[str], origin: str, task_name: str) -> None:
    for column in columns:
        if column not in rows.column_names:
            raise UserError(f"{origin}: column {column!r} needed by task {task_name!r} is missing; "
                            f"columns present: {rows.column_names}")


def _whole(rows: datasets.Dataset, origin: str, split: str) -> SourceSplit:
    return SourceSplit(rows, np.arange(len(rows)), origin, split)


def _split_one_file(rows: datasets.Dataset, origin: str, test_fraction: float) -> dict[str, SourceSplit]:
    """A fixed-seed permutation of the file's rows; the first round(N * test_fraction) are the test split."""
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test_fraction must be in (0, 1) to split a single data file, got {test_fraction}")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(rows))
    n_test = min(max(1, round(len(rows) * test_fraction)), len(rows) - 1)
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return {"train": SourceSplit(rows.select(train), train, origin, "train"),
            "test": SourceSplit(rows.select(test), test, origin, "test")}


def load_source_splits(cfg, columns: Iterable[str]) -> dict[str, SourceSplit]:
    """The train and test rows named by `cfg` (data_files first, else the Hub), checked for `columns`."""
    files = parse_data_files(cfg.data_files)
    if files is None:
        if not cfg.hf_path:
            raise UserError(f"task {cfg.name!r}: set data_files (local files: {data_files_hint(cfg.name, columns)}) "
                            "or hf_path (a Hub dataset)")
        splits = {}
        for role, split in (("train", cfg.train_split), ("test", cfg.test_split)):
            origin = f"{hub_name(cfg)}:{split}"
            splits[role] = _whole(load_hub_split(cfg, split, columns), origin, split)
    elif "all" in files:
        rows, origin = load_files(files["all"])
        splits = _split_one_file(rows, origin, cfg.test_fraction)
    else:
        splits = {role: _whole(*load_files(files[role]), role) for role in ("train", "test")}
    for split in splits.values():
        check_columns(split.rows, columns, split.origin, cfg.name)
        if len(split.rows) == 0:
            raise UserError(f"{split.origin}: no rows")
    return splits


def hub_name(cfg) -> str:
    return cfg.hf_path + (f"/{cfg.hf_name}" if cfg.hf_name else "")


def data_files_hint(name: str, columns: Iterable[str]) -> str:
    """How to give a task's data as local files instead of the Hub."""
    writer = f"; `python -m w2s_jax.data.nlp {name}` writes them from the Hub (docs/CLI.md)" if name in TASKS else ""
    return (f"--config.task.data_files=train={name}_train.jsonl,test={name}_test.jsonl (json, jsonl, csv or "
            f"parquet) with columns {', '.join(columns)}{writer}")


@functools.cache
def hub_unusable() -> str:
    """Why the Hugging Face Hub cannot be used ("" if it answers within 5 s). Checked once, so that a machine
    without it fails in seconds instead of after minutes of the libraries' retries."""
    from huggingface_hub import constants, get_session
    if constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE)"
    try:
        get_session().head(constants.ENDPOINT, timeout=5.0)
    except Exception:  # the HTTP library's connection and timeout errors: no answer
        return f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached"
    return ""


def load_hub_split(cfg, split: str, columns: Iterable[str]) -> datasets.Dataset:
    """One split from the Hub; without the Hub, from the datasets cache (offline mode), else a UserError that
    says how to give local files."""
    why = hub_unusable()
    if why:
        from huggingface_hub import constants
        constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True  # the cache only, no retries
    try:
        return datasets.load_dataset(cfg.hf_path, cfg.hf_name or None, split=split)
    except ConnectionError as e:  # offline mode and not cached, or the Hub went away
        raise UserError(f"task {cfg.name!r}: {why or 'the Hugging Face Hub cannot be reached'} and "
                        f"{hub_name(cfg)} is not in the datasets cache; give local files: "
                        f"{data_files_hint(cfg.name, columns)}") from e
    except datasets.exceptions.DatasetNotFoundError as e:
        raise UserError(f"task.hf_path={cfg.hf_path!r}: {e} Or give local files: "
                        f"{data_files_hint(cfg.name, columns)}") from e


def shuffled_rows(split: SourceSplit, seed: int) -> Iterator[tuple[int, dict]]:
    """(source_index, row) in a permutation drawn from `seed`; rows are read lazily."""
    order = np.random.default_rng(seed).permutation(len(split.rows))
    for position, row in zip(order, split.rows.select(order)):
        yield int(split.source_indices[position]), row


# ----------------------------------------------------------------------------------------------------------------
# Formatting, filtering, balancing.


def balanced_prefix(items: Iterable[Any], n: int, label_of: Callable[[Any], int]) -> list:
    """Undersample a binary stream to 50/50 in stream order; reads only as far as it needs.

    Each class keeps its first m items, m = ceil(n/2) (n <= 0: no limit) or the smaller class's count if the
    stream runs out first; the result is those items in stream order, cut to n.
    """
    per_class = math.ceil(n / 2) if n > 0 else math.inf
    by_class = {0: [], 1: []}
    for position, item in enumerate(items):
        bucket = by_class[label_of(item)]
        if len(bucket) < per_class:
            bucket.append((position, item))
        if min(len(bucket) for bucket in by_class.values()) >= per_class:
            break
    m = min(len(bucket) for bucket in by_class.values())
    kept = sorted(by_class[0][:m] + by_class[1][:m], key=lambda entry: entry[0])
    balanced = [item for _, item in kept]
    return balanced[:n] if n > 0 else balanced


def formatted_rows(task: NlpTask, split: SourceSplit, seed: int, max_chars: int) -> Iterator[tuple[int, str, int]]:
    """(source_index, text, label) in visiting order, without unusable rows, empty texts and over-long texts."""
    rng = random.Random(seed)
    for source_index, row in shuffled_rows(split, seed):
        formatted = task.format(row, rng)
        if formatted is None:
            continue
        text, label = formatted
        if not text or not text.strip():
            continue
        if max_chars > 0 and len(text) > max_chars:
            continue
        yield source_index, text, label


def load_nlp_task(task_cfg) -> dict[str, list[dict]]:
    """{"train": [Example], "test": [Example]} for a binary NLP task (order and options: module docstring)."""
    cfg = with_defaults(task_cfg, default_task_config)
    task = get_task(cfg.name)
    label_words = list(cfg.label_words)
    if len(label_words) != 2:
        raise UserError(f"task {cfg.name!r}: label_words must name 2 classes, got {label_words}")
    sources = load_source_splits(cfg, task.columns)
    result = {}
    for role, n in (("train", cfg.n_train), ("test", cfg.n_test)):
        split = sources[role]
        rows = formatted_rows(task, split, cfg.seed, cfg.max_chars)
        if cfg.balance:
            kept = balanced_prefix(rows, n, label_of=lambda item: item[2])
        else:
            kept = list(itertools.islice(rows, n) if n > 0 else rows)
        if not kept:
            raise UserError(f"task {cfg.name!r}: no {role} examples left from {split.origin} after formatting, "
                            f"max_chars={cfg.max_chars} and balance={cfg.balance}")
        if n > 0 and len(kept) < n:
            log.warning("task %s: only %d %s examples (asked for %d) from %s", cfg.name, len(kept), role, n,
                        split.origin)
        result[role] = [
            {"id": f"{cfg.name}/{role}/{source_index}", "prompt": text, "candidates": list(label_words),
             "label": int(label), "meta": {"source_index": source_index, "source_split": split.split}}
            for source_index, text, label in kept
        ]
    return result


def write_task_files(name: str, directory: str = ".") -> dict[str, str]:
    """A task's train and test splits from the Hub as DIR/NAME_train.jsonl and DIR/NAME_test.jsonl, with the
    columns its formatter reads: local files for `--config.task.data_files` on a machine without the Hub."""
    task, cfg = get_task(name), default_task_config(name)
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for role in ("train", "test"):
        rows = load_hub_split(cfg, cfg[f"{role}_split"], task.columns).select_columns(list(task.columns))
        paths[role] = os.path.join(directory, f"{name}_{role}.jsonl")
        rows.to_json(paths[role], lines=True)
    return paths


if __name__ == "__main__":
    # python -m w2s_jax.data.nlp TASK [DIR]
    if len(sys.argv) not in (2, 3) or sys.argv[1] not in TASKS:
        sys.exit(f"usage: python -m w2s_jax.data.nlp TASK [DIR]; tasks: {', '.join(sorted(TASKS))}")
    try:
        written = write_task_files(*sys.argv[1:])
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"--config.task.data_files=train={written['train']},test={written['test']}")
