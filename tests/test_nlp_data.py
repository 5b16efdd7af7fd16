"""NLP task loaders: exact formatting, balancing, filtering, sizes, determinism and errors (offline fixtures)."""
import collections
import gzip
import json

import datasets
import huggingface_hub
import pandas as pd
import pytest

from w2s_jax.data import nlp
from w2s_jax.errors import UserError


class StubRng:
    """Stands in for random.Random: a fixed coin, choice() takes the first option, shuffle() reverses."""

    def __init__(self, coin):
        self.coin = coin

    def random(self):
        return self.coin

    def choice(self, options):
        return options[0]

    def shuffle(self, items):
        items.reverse()


RIGHT, WRONG = StubRng(0.25), StubRng(0.75)   # coin < 0.5 shows the right answer (label 1)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_csv(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def write_parquet(path, rows):
    pd.DataFrame(rows).to_parquet(path, index=False)
    return str(path)


def config(name, **overrides):
    cfg = nlp.default_task_config(name)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Formatters, one real-schema row each, expected strings written by hand.

SCIQ = {"question": "What do plants make?", "distractor3": "salt", "distractor1": "helium", "distractor2": "iron",
        "correct_answer": "sugar", "support": "Plants make sugar."}
COSMOS = {"id": "c1", "context": "I missed the bus.", "question": "Why was I late?", "answer0": "I slept in.",
          "answer1": "It rained.", "answer2": "I missed the bus.", "answer3": "I was early.", "label": 2}
COSMOS_NONE = dict(COSMOS, answer3="None of the above choices .", label=3)
HH = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
HELLASWAG = {"ind": 4, "activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "",
             "ctx": "A man mixes flour.",
             "endings": ["he bakes.", "he swims.", "he sings.", "he flies."], "source_id": "s1", "split": "train",
             "split_type": "indomain", "label": "0"}
SIQA = {"context": "Tom lost his keys.", "question": "How does Tom feel?", "answerA": "upset", "answerB": "happy",
        "answerC": "sleepy", "label": "1"}
OBQA = {"id": "7-980", "question_stem": "The sun is",
        "choices": {"text": ["cold", "a star", "a moon", "wet"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"}
QUARTZ = {"id": "q1", "question": "More heat makes ice melt", "choices": {"text": ["faster", "slower"],
          "label": ["A", "B"]}, "answerKey": "A", "para": "Heat melts ice.", "para_id": "p1"}
DREAM = {"id": 0, "dialogue_id": "5-510", "dialogue": ["M: Hi.", "W: Hello."], "question": "Who speaks first?",
         "choice": ["The man.", "The woman.", "Nobody."], "answer": "The man."}
QUAIL = {"id": "f001_0", "context_id": "f001", "question_id": "0", "domain": "fiction", "context": "Ann ran.",
         "question": "Who ran?", "question_type": "Character_identity",
         "answers": ["Bob", "Ann", "Cid", "not enough information"], "correct_answer_id": 1}

FORMAT_CASES = [
    ("sciq", SCIQ, RIGHT, "Q: What do plants make? A: sugar", 1),
    ("sciq", SCIQ, WRONG, "Q: What do plants make? A: helium", 0),
    ("boolq", {"question": "is the sky blue", "answer": True, "passage": "The sky looks blue."}, RIGHT,
     "Passage: The sky looks blue.\nQuestion: is the sky blue", 1),
    ("amazon_polarity", {"label": 0, "title": "Broke", "content": "It broke in a day."}, RIGHT,
     "Broke It broke in a day.", 0),
    ("cosmos_qa", COSMOS, RIGHT, "Context: I missed the bus.\nQuestion: Why was I late?\nAnswer: I missed the bus.", 1),
    ("cosmos_qa", COSMOS, WRONG, "Context: I missed the bus.\nQuestion: Why was I late?\nAnswer: I slept in.", 0),
    # the right answer is "None of the above choices .": always shown a wrong answer, label 0, whatever the coin
    ("cosmos_qa", COSMOS_NONE, RIGHT, "Context: I missed the bus.\nQuestion: Why was I late?\nAnswer: I slept in.", 0),
    ("anthropic_hh", HH, RIGHT, "\n\nHuman: Hi\n\nAssistant: Hello!", 1),
    ("anthropic_hh", HH, WRONG, "\n\nHuman: Hi\n\nAssistant: Go away.", 0),
    ("sst2", {"sentence": "a gem of a film .", "label": 1, "idx": 3}, RIGHT, "a gem of a film .", 1),
    ("cola", {"sentence": "Him went home.", "label": 0, "idx": 9}, RIGHT, "Him went home.", 0),
    ("twitter_sentiment", {"text": "great day", "label": 1}, RIGHT, "great day", 1),
    ("piqa", {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0}, RIGHT,
     "Q: Open a jar A: twist the lid", 1),
    ("piqa", {"goal": "Open a jar", "sol1": "eat the lid", "sol2": "twist the lid", "label": 1}, WRONG,
     "Q: Open a jar A: eat the lid", 0),
    ("hellaswag", HELLASWAG, RIGHT,
     'Context:\nA man mixes flour.\n\nContinuations:\n\nhe bakes.\nhe swims.\nhe sings.\nhe flies.\n\n'
     'Q: Is "he bakes." the best continuation?', 1),
    ("hellaswag", HELLASWAG, WRONG,
     'Context:\nA man mixes flour.\n\nContinuations:\n\nhe bakes.\nhe swims.\nhe sings.\nhe flies.\n\n'
     'Q: Is "he swims." the best continuation?', 0),
    ("social_i_qa", SIQA, RIGHT, 'Context:\nTom lost his keys.\n\nQuestion: "How does Tom feel?"\n\nChoices:\nupset\n'
     'happy\nsleepy\n\nIs the answer "upset"?', 1),
    ("social_i_qa", SIQA, WRONG, 'Context:\nTom lost his keys.\n\nQuestion: "How does Tom feel?"\n\nChoices:\nupset\n'
     'happy\nsleepy\n\nIs the answer "happy"?', 0),
    ("openbookqa", OBQA, RIGHT,
     "Q: The sun is\n\nChoices:\nA) cold\nB) a star\nC) a moon\nD) wet\n\nAnswer: a star", 1),
    ("openbookqa", OBQA, WRONG,
     "Q: The sun is\n\nChoices:\nA) cold\nB) a star\nC) a moon\nD) wet\n\nAnswer: cold", 0),
    ("quartz", QUARTZ, RIGHT, 'Passage:\nHeat melts ice.\n\nQ: "More heat makes ice melt" Is the answer "faster"?', 1),
    ("quartz", QUARTZ, WRONG, 'Passage:\nHeat melts ice.\n\nQ: "More heat makes ice melt" Is the answer "slower"?', 0),
    ("dream", DREAM, RIGHT, "M: Hi.\nW: Hello.\n\nQ: Who speaks first? A: The man.", 1),
    ("dream", DREAM, WRONG, "M: Hi.\nW: Hello.\n\nQ: Who speaks first? A: The woman.", 0),
    ("quail", QUAIL, RIGHT, 'Passage:\n\nAnn ran.\n\nQ: "Who ran?" Is the answer "Ann"?', 1),
    ("quail", QUAIL, WRONG, 'Passage:\n\nAnn ran.\n\nQ: "Who ran?" Is the answer "Bob"?', 0),
    ("multirc", {"paragraph": "Ann ran home.", "question": "Where?", "answer": "home",
                 "idx": {"paragraph": 0, "question": 0, "answer": 0}, "label": 1}, RIGHT,
     'Passage:\n\nAnn ran home.\n\nQ: "Where?" Is the answer "home"?', 1),
    ("anli_r2", {"uid": "u1", "premise": "A dog runs.", "hypothesis": "An animal moves.", "label": 0, "reason": ""},
     RIGHT, "Premise: A dog runs.\nHypothesis: An animal moves.\n\nDoes the premise entail the hypothesis?", 1),
    ("anli_r2", {"uid": "u2", "premise": "A dog runs.", "hypothesis": "A cat sleeps.", "label": 2, "reason": ""},
     RIGHT, "Premise: A dog runs.\nHypothesis: A cat sleeps.\n\nDoes the premise entail the hypothesis?", 0),
    ("paws", {"id": 1, "sentence1": "He left.", "sentence2": "He went away.", "label": 1}, RIGHT,
     "Sent 1: He left.\nSent 2: He went away.\n\nQ: Are these sentences semantically equivalent?", 1),
    ("wic", {"word": "bank", "sentence1": "The river bank.", "sentence2": "The bank loan.", "start1": 10, "start2": 4,
             "end1": 14, "end2": 8, "idx": 0, "label": 0}, RIGHT,
     'Sentence 1:\nThe river bank.\n\nSentence 2:\nThe bank loan.\n\nQ: Does "bank" have the same meaning in the '
     'above sentences?', 0),
    ("mc_taco", {"sentence": "He slept.", "question": "How long did he sleep?", "answer": "8 hours", "label": 1,
                 "category": "Event Duration"}, RIGHT,
     "He slept.\n\nGiven the above, How long did he sleep? Is the answer 8 hours?", 1),
    ("ethics_deontology", {"label": 1, "scenario": "Can you help me?", "excuse": "No, I am in surgery."}, RIGHT,
     "Q: Is the following a morally valid excuse?\n\nCan you help me?\n\nNo, I am in surgery.\n\nA:", 1),
    ("ethics_justice", {"label": 0, "scenario": "I deserve a raise because I am tall."}, RIGHT,
     "Q: Does this statement exemplify justice?\n\nI deserve a raise because I am tall.\n\nA:", 0),
    ("ethics_virtue", {"label": 1, "scenario": "She gave away her food. [SEP] generous"}, RIGHT,
     "Q: Does this behavior match the adjective that follows?\n\nShe gave away her food. [SEP] generous\n\nA:", 1),
    # StubRng.shuffle reverses: options become ["I lost.", "I won."], the right answer is 2
    ("ethics_utilitarianism", {"baseline": "I won.", "less_pleasant": "I lost."}, RIGHT,
     "Which is more pleasant?\n1) I lost.\n2) I won. A: 2", 1),
    ("ethics_utilitarianism", {"baseline": "I won.", "less_pleasant": "I lost."}, WRONG,
     "Which is more pleasant?\n1) I lost.\n2) I won. A: 1", 0),
]


@pytest.mark.parametrize("name,row,rng,text,label", FORMAT_CASES)
def test_formatter_exact(name, row, rng, text, label):
    assert nlp.get_task(name).format(row, rng) == (text, label)


def test_every_task_has_an_exact_formatting_case():
    assert {case[0] for case in FORMAT_CASES} == set(nlp.TASKS)


@pytest.mark.parametrize("name,row", [(case[0], case[1]) for case in FORMAT_CASES])
def test_formatter_reads_only_its_declared_columns(name, row):
    task = nlp.get_task(name)
    assert task.format({column: row[column] for column in task.columns}, RIGHT) is not None


@pytest.mark.parametrize("name,row", [
    ("sst2", {"sentence": "unlabelled .", "label": -1, "idx": 0}),
    ("hellaswag", dict(HELLASWAG, label="")),
    ("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": -1}),
    ("social_i_qa", dict(SIQA, label="4")),
])
def test_rows_without_a_usable_label_are_skipped(name, row):
    assert nlp.get_task(name).format(row, RIGHT) is None


# ---------------------------------------------------------------------------------------------------------------
# Loading from local files.


def sciq_rows(n):
    return [{"question": f"Question {i}?", "distractor3": f"wrong c{i}", "distractor1": f"wrong a{i}",
             "distractor2": f"wrong b{i}", "correct_answer": f"right {i}", "support": ""} for i in range(n)]


def test_sciq_jsonl_every_example_follows_the_coin_flip_rule(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sciq_rows(40))
    test = write_jsonl(tmp_path / "test.jsonl", sciq_rows(10))
    out = nlp.load_nlp_task(config("sciq", data_files=f"train={train},test={test}", n_train=0, n_test=0))
    assert len(out["train"]) == 2 * min(collections.Counter(e["label"] for e in out["train"]).values())
    for role in ("train", "test"):
        for example in out[role]:
            i = example["meta"]["source_index"]
            assert example["id"] == f"sciq/{role}/{i}"
            assert example["candidates"] == ["0", "1"]
            if example["label"] == 1:
                assert example["prompt"] == f"Q: Question {i}? A: right {i}"
            else:
                assert example["prompt"] in {f"Q: Question {i}? A: wrong {x}{i}" for x in "abc"}


def test_boolq_csv_exact_examples(tmp_path):
    rows = [{"question": "is water wet", "answer": True, "passage": "Water, it is said, is wet.\nVery wet."},
            {"question": "is fire cold", "answer": False, "passage": "Fire is hot."},
            {"question": "do cats bark", "answer": False, "passage": "Cats meow."}]
    path = write_csv(tmp_path / "boolq.csv", rows)
    out = nlp.load_nlp_task(config("boolq", data_files=f"train={path},test={path}", n_train=0, n_test=0,
                                   balance=False, label_words=(" No", " Yes")))
    by_index = {e["meta"]["source_index"]: e for e in out["train"]}
    assert by_index == {
        0: {"id": "boolq/train/0", "prompt": "Passage: Water, it is said, is wet.\nVery wet.\nQuestion: is water wet",
            "candidates": [" No", " Yes"], "label": 1, "meta": {"source_index": 0, "source_split": "train"}},
        1: {"id": "boolq/train/1", "prompt": "Passage: Fire is hot.\nQuestion: is fire cold",
            "candidates": [" No", " Yes"], "label": 0, "meta": {"source_index": 1, "source_split": "train"}},
        2: {"id": "boolq/train/2", "prompt": "Passage: Cats meow.\nQuestion: do cats bark",
            "candidates": [" No", " Yes"], "label": 0, "meta": {"source_index": 2, "source_split": "train"}},
    }


def amazon_rows(n_pos, n_neg):
    rows = [{"label": 1, "title": f"Good {i}", "content": "x" * i} for i in range(n_pos)]
    rows += [{"label": 0, "title": f"Bad {i}", "content": "y" * i} for i in range(n_neg)]
    return rows


@pytest.fixture
def amazon_files(tmp_path):
    train = write_parquet(tmp_path / "train.parquet", amazon_rows(30, 10))
    test = write_parquet(tmp_path / "test.parquet", amazon_rows(6, 6))
    return f"train={train},test={test}"


def label_counts(examples):
    return collections.Counter(e["label"] for e in examples)


def test_balance_undersamples_the_majority_class(amazon_files):
    out = nlp.load_nlp_task(config("amazon_polarity", data_files=amazon_files, n_train=0, n_test=0))
    assert label_counts(out["train"]) == {0: 10, 1: 10}
    unbalanced = nlp.load_nlp_task(config("amazon_polarity", data_files=amazon_files, n_train=0, n_test=0,
                                          balance=False))
    assert label_counts(unbalanced["train"]) == {0: 10, 1: 30}


def test_n_train_and_n_test_are_honoured(amazon_files):
    out = nlp.load_nlp_task(config("amazon_polarity", data_files=amazon_files, n_train=8, n_test=3))
    assert label_counts(out["train"]) == {0: 4, 1: 4}
    assert len(out["test"]) == 3 and set(label_counts(out["test"]).values()) == {1, 2}
    unbalanced = nlp.load_nlp_task(config("amazon_polarity", data_files=amazon_files, n_train=25, n_test=3,
                                          balance=False))
    assert len(unbalanced["train"]) == 25
    # more than the data has: everything balanced there is
    assert len(nlp.load_nlp_task(config("amazon_polarity", data_files=amazon_files, n_train=500))["train"]) == 20


def test_max_chars_drops_long_texts_before_balancing(amazon_files):
    # "Good i " + "x"*i has 7 + i characters and "Bad i " + "y"*i has 6 + i: max_chars=10 keeps positives
    # i <= 3 (4 rows) and negatives i <= 4 (5 rows, source indices 30-34); balancing leaves 4 of each
    out = nlp.load_nlp_task(config("amazon_polarity", data_files=amazon_files, n_train=0, n_test=0, max_chars=10))
    assert label_counts(out["train"]) == {0: 4, 1: 4}
    assert max(len(e["prompt"]) for e in out["train"]) == 10
    assert {e["meta"]["source_index"] for e in out["train"] if e["label"] == 1} == {0, 1, 2, 3}
    assert {e["meta"]["source_index"] for e in out["train"] if e["label"] == 0} < {30, 31, 32, 33, 34}


def test_same_seed_gives_identical_examples_and_another_seed_differs(amazon_files):
    def load(seed):
        return nlp.load_nlp_task(config("amazon_polarity", data_files=amazon_files, n_train=12, n_test=0, seed=seed))

    first, again, other = load(3), load(3), load(4)
    assert json.dumps(first) == json.dumps(again)
    assert [e["id"] for e in first["train"]] != [e["id"] for e in other["train"]]


def test_ids_name_the_same_source_row_under_every_seed(tmp_path):
    path = write_jsonl(tmp_path / "sciq.jsonl", sciq_rows(30))
    files = f"train={path},test={path}"
    a = nlp.load_nlp_task(config("sciq", data_files=files, n_train=0, balance=False, seed=0))["train"]
    b = nlp.load_nlp_task(config("sciq", data_files=files, n_train=0, balance=False, seed=1))["train"]
    assert sorted(e["id"] for e in a) == sorted(e["id"] for e in b) == sorted(f"sciq/train/{i}" for i in range(30))
    assert len({e["id"] for e in a}) == 30
    assert [e["prompt"] for e in a] != [e["prompt"] for e in b]   # new order and new coin flips


def test_single_file_is_split_once_with_a_fixed_seed(tmp_path):
    path = write_jsonl(tmp_path / "sciq.jsonl", sciq_rows(20))
    runs = [nlp.load_nlp_task(config("sciq", data_files=path, n_train=0, n_test=0, balance=False,
                                     test_fraction=0.25, seed=seed)) for seed in (0, 1)]
    for out in runs:
        train = {e["meta"]["source_index"] for e in out["train"]}
        test = {e["meta"]["source_index"] for e in out["test"]}
        assert len(test) == 5 and not train & test and train | test == set(range(20))
    assert ({e["id"] for e in runs[0]["test"]} == {e["id"] for e in runs[1]["test"]})


def test_hidden_labels_are_dropped_and_glue_sentences_load(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(6)])
    test = write_jsonl(tmp_path / "test.jsonl", [{"sentence": f"t{i}", "label": -1 if i < 3 else i % 2, "idx": i}
                                                 for i in range(7)])
    out = nlp.load_nlp_task(config("sst2", data_files=f"train={train},test={test}", n_train=0, n_test=0,
                                   balance=False))
    assert sorted(e["prompt"] for e in out["test"]) == ["t3", "t4", "t5", "t6"]
    assert {e["prompt"]: e["label"] for e in out["train"]} == {"s0": 0, "s1": 1, "s2": 0, "s3": 1, "s4": 0, "s5": 1}


def test_nested_columns_load_from_parquet(tmp_path):
    rows = [dict(HELLASWAG, label=str(i % 4), ind=i) for i in range(8)]
    path = write_parquet(tmp_path / "hellaswag.parquet", rows)
    out = nlp.load_nlp_task(config("hellaswag", data_files=f"train={path},test={path}", n_train=0, n_test=0))
    assert len(out["train"]) >= 2
    for e in out["train"]:
        right = HELLASWAG["endings"][int(rows[e["meta"]["source_index"]]["label"])]
        assert (f'Q: Is "{right}" the best continuation?' in e["prompt"]) == (e["label"] == 1)


def test_a_plain_dict_config_gets_the_defaults(tmp_path):
    path = write_jsonl(tmp_path / "sciq.jsonl", sciq_rows(10))
    out = nlp.load_nlp_task({"name": "sciq", "data_files": f"train={path},test={path}", "n_train": 2})
    assert len(out["train"]) == 2 and out["train"][0]["candidates"] == ["0", "1"]


# ---------------------------------------------------------------------------------------------------------------
# Errors.


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown NLP task 'sqiq'.*boolq.*sciq"):
        nlp.default_task_config("sqiq")
    with pytest.raises(ValueError, match="unknown NLP task"):
        nlp.load_nlp_task({"name": "sqiq"})


def test_missing_file_names_the_key_and_the_path(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=f"data_files: no file matches '{missing}'") as error:
        nlp.load_nlp_task(config("sciq", data_files=missing))
    assert isinstance(error.value, UserError)


SCIQ_LINE = json.dumps(SCIQ) + "\n"


@pytest.mark.parametrize("name,text,message", [
    ("rows.jsonl", SCIQ_LINE * 2 + '{"question": "Q?"\n' + SCIQ_LINE,
     "{path}:3: not valid JSON (Expecting ',' delimiter at column 18); each line must be one JSON object"),
    ("rows.jsonl", SCIQ_LINE + "\n" + '["a", "b"]\n', '{path}:3: a JSON list, not an object {{"column": value, ...}}'),
    ("rows.json", '[\n  {"question": "Q?"},\n  {"question": "R?"\n]\n',
     "{path}:4: not valid JSON (Expecting ',' delimiter at column 1)"),
    ("rows.jsonl", "", "{path}: empty file; a data file needs rows with the task's columns"),
])
def test_a_bad_row_is_named_by_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError) as error:
        nlp.load_nlp_task(config("sciq", data_files=str(path)))
    assert str(error.value) == message.format(path=path)


def test_a_bad_row_of_a_compressed_file_is_found_too(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(SCIQ_LINE + "{oops}\n")
    assert nlp.first_bad_json_row(str(path)) == (f"{path}:2: not valid JSON (Expecting property name enclosed in "
                                                 "double quotes at column 2); each line must be one JSON object")
    assert nlp.first_bad_json_row(write_jsonl(tmp_path / "fine.jsonl", sciq_rows(3))) is None


def test_without_the_hub_the_error_says_how_to_give_local_files(monkeypatch):
    """Offline mode (set here, restored after the test): datasets fails at once, and the line shows data_files."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", "/nonexistent/cache")
    nlp.hub_unusable.cache_clear()
    with pytest.raises(UserError) as error:
        nlp.load_nlp_task(config("boolq"))
    nlp.hub_unusable.cache_clear()
    assert str(error.value) == (
        "task 'boolq': offline mode is on (HF_HUB_OFFLINE) and google/boolq is not in the datasets cache; give local "
        "files: --config.task.data_files=train=boolq_train.jsonl,test=boolq_test.jsonl (json, jsonl, csv or "
        "parquet) with columns passage, question, answer; `python -m w2s_jax.data.nlp boolq` writes them from the "
        "Hub (docs/CLI.md)")


def test_write_task_files_keeps_the_task_columns_and_loads_back(tmp_path, monkeypatch):
    hub = {"train": sciq_rows(10), "test": sciq_rows(6)}   # rows with an extra column, "support"
    monkeypatch.setattr(nlp, "load_hub_split", lambda cfg, split, columns: datasets.Dataset.from_list(hub[split]))
    paths = nlp.write_task_files("sciq", str(tmp_path))
    assert paths == {"train": str(tmp_path / "sciq_train.jsonl"), "test": str(tmp_path / "sciq_test.jsonl")}
    rows = [json.loads(line) for line in open(paths["train"])]
    assert len(rows) == 10 and list(rows[0]) == list(nlp.TASKS["sciq"].columns)
    out = nlp.load_nlp_task(config("sciq", data_files=f"train={paths['train']},test={paths['test']}", n_train=0,
                                   n_test=0, balance=False))
    assert (len(out["train"]), len(out["test"])) == (10, 6)


def test_missing_column_names_the_file_the_column_and_the_columns_present(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "distractor2"} for row in sciq_rows(4)]
    path = write_jsonl(tmp_path / "sciq.jsonl", rows)
    with pytest.raises(ValueError) as error:
        nlp.load_nlp_task(config("sciq", data_files=f"train={path},test={path}"))
    message = str(error.value)
    assert path in message and "'distractor2'" in message
    assert "['question', 'distractor3', 'distractor1', 'correct_answer', 'support']" in message


@pytest.mark.parametrize("spec,match", [("train=a.jsonl,valid=b.jsonl", "expected 'PATH' or 'train=PATH,test=PATH'"),
                                        ("{dir}/data.txt", "unsupported extension")])
def test_bad_data_files(tmp_path, spec, match):
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ValueError, match=match):
        nlp.load_nlp_task(config("sciq", data_files=spec.format(dir=tmp_path)))


def test_one_class_split_cannot_be_balanced(tmp_path):
    path = write_jsonl(tmp_path / "amazon.jsonl", amazon_rows(5, 0))
    with pytest.raises(ValueError, match="no train examples left"):
        nlp.load_nlp_task(config("amazon_polarity", data_files=f"train={path},test={path}"))


def test_label_words_must_name_two_classes(tmp_path):
    path = write_jsonl(tmp_path / "sciq.jsonl", sciq_rows(4))
    with pytest.raises(ValueError, match="label_words must name 2 classes"):
        nlp.load_nlp_task(config("sciq", data_files=path, label_words=("a", "b", "c")))


def test_balanced_prefix_keeps_stream_order():
    stream = [(i, label) for i, label in enumerate([1, 1, 1, 0, 1, 0, 0, 0])]
    assert nlp.balanced_prefix(stream, 4, label_of=lambda x: x[1]) == [(0, 1), (1, 1), (3, 0), (5, 0)]
    assert nlp.balanced_prefix(stream, 0, label_of=lambda x: x[1]) == stream
    assert nlp.balanced_prefix(stream[:5], 0, label_of=lambda x: x[1]) == [(0, 1), (3, 0)]
    assert nlp.balanced_prefix(stream, 3, label_of=lambda x: x[1]) == [(0, 1), (1, 1), (3, 0)]
    assert nlp.balanced_prefix(stream, 100, label_of=lambda x: x[1]) == stream
