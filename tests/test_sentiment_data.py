"""The sentiment snippet loader on small snippet files written here (the real files: docs/ASSETS.md)."""
import json

import pytest

from w2s_jax.data import nlp
from w2s_jax.data.sentiment import (DEFAULT_TEMPLATE, SOURCES, default_task_config, load_sentiment_task,
                                    read_snippets, snippets_to_jsonl)
from w2s_jax.errors import UserError

# amazon-style ids: review 1..20, sentence 1..3; ratings alternate in sign, every 5th one near zero.
AMAZON = [(f"{review}_{sentence}", (-1) ** (review + sentence) * (0.2 if (review + sentence) % 5 == 0 else 1.5),
           f"review {review} sentence {sentence} &amp; more")
          for review in range(1, 21) for sentence in range(1, 4)]
# movie-style ids (no document): 40 snippets, 30 positive, 10 negative, ratings well away from 0.
MOVIE = [(str(i), 2.0 if i % 4 else -2.5, f"movie line {i}") for i in range(1, 41)]


def write_snippets(folder, source, rows, newline="\r\n"):
    lines = [f"{snippet_id}\t{rating}\t{text}" for snippet_id, rating, text in rows]
    (folder / SOURCES[source]).write_bytes(newline.join(lines).encode("utf-8"))  # no final newline, as the originals
    return folder / SOURCES[source]


@pytest.fixture
def data_dir(tmp_path):
    write_snippets(tmp_path, "amazon", AMAZON)
    write_snippets(tmp_path, "movie", MOVIE)
    return tmp_path


def load(data_dir, **overrides):
    return load_sentiment_task({"data_dir": str(data_dir), "sources": "amazon", **overrides})


def test_examples_have_the_contract_shape(data_dir):
    data = load(data_dir)
    example = data["train"][0]
    assert set(example) == {"id", "prompt", "candidates", "label", "group", "meta"}
    review, sentence = example["meta"]["snippet_id"].split("_")
    assert example["id"] == f"sentiment/amazon/{review}_{sentence}"
    assert example["group"] == f"amazon/{review}"
    assert example["prompt"] == DEFAULT_TEMPLATE.format(sentence=f"review {review} sentence {sentence} & more")
    assert example["candidates"] == [" negative", " positive"]
    assert example["label"] == int(example["meta"]["rating"] > 0)
    ids = [e["id"] for e in data["train"] + data["test"]]
    assert len(ids) == len(set(ids))


def test_margin_drops_and_counts_ambiguous_snippets(data_dir):
    data = load(data_dir, balance=False)
    near_zero = sum(abs(rating) < 0.5 for _, rating, _ in AMAZON)
    assert near_zero == 12
    counts = data["counts"]
    assert counts["snippets"] == len(AMAZON)
    assert sum(counts["ambiguous"].values()) == near_zero
    assert len(data["train"]) + len(data["test"]) == len(AMAZON) - near_zero
    assert all(abs(e["meta"]["rating"]) >= 0.5 for e in data["train"] + data["test"])
    assert "dropped 12 with |rating| < 0.5" in data["notes"][0]
    kept_all = load(data_dir, balance=False, margin=0.0)
    assert sum(kept_all["counts"]["ambiguous"].values()) == 0


def test_test_split_is_whole_documents_and_independent_of_seed_and_margin(data_dir):
    runs = [load(data_dir, seed=seed, margin=margin) for seed, margin in ((0, 0.5), (1, 0.5), (0, 0.0))]
    test_docs = [{e["group"] for e in run["test"]} for run in runs]
    assert test_docs[0] == test_docs[1]
    assert test_docs[0] <= test_docs[2]  # margin 0 keeps more snippets, of the same documents
    for run in runs:
        assert not {e["group"] for e in run["train"]} & {e["group"] for e in run["test"]}
    assert runs[0]["test"] == runs[1]["test"]
    assert [e["id"] for e in runs[0]["train"]] != [e["id"] for e in runs[1]["train"]]  # the seed orders the pool


def test_pretraining_corpus_is_the_train_side_without_ratings(data_dir):
    data = load(data_dir, corpus_sources="amazon,movie")
    test_texts = {t for e in load(data_dir, sources="amazon,movie", margin=0.0, balance=False)["test"]
                  for t in [e["prompt"].split("Review: ")[1].split("\n")[0]]}
    corpus = data["corpus"]
    assert len(corpus) == len(set(corpus)) and not set(corpus) & test_texts
    # every snippet is on one side: the corpus and the test pools (ambiguous ones included) cover both files
    assert len(corpus) + len(test_texts) == len(AMAZON) + len(MOVIE)
    assert "review 1 sentence 1 & more" in corpus or "review 1 sentence 1 & more" in test_texts
    assert "pretraining corpus:" in data["notes"][-1]
    assert "corpus" not in load(data_dir)  # without corpus_sources the pipeline pretrains on the prompts
    with pytest.raises(UserError, match="task.corpus_sources='books': expected"):
        load(data_dir, corpus_sources="books")


def test_same_config_gives_identical_examples(data_dir):
    assert load(data_dir, seed=3) == load(data_dir, seed=3)


def test_balance_and_sizes(tmp_path):
    write_snippets(tmp_path, "movie", MOVIE)
    data = load_sentiment_task({"data_dir": str(tmp_path), "sources": "movie", "n_train": 10, "n_test": 4})
    for role, n in (("train", 10), ("test", 4)):
        labels = [e["label"] for e in data[role]]
        assert len(labels) == n and sum(labels) == n // 2
    unbalanced = load_sentiment_task({"data_dir": str(tmp_path), "sources": "movie", "balance": False})
    assert sum(e["label"] for e in unbalanced["train"] + unbalanced["test"]) == 30
    balanced = load_sentiment_task({"data_dir": str(tmp_path), "sources": "movie"})
    for role in ("train", "test"):
        labels = [e["label"] for e in balanced[role]]
        assert sum(labels) * 2 == len(labels)


def test_sources_combine_and_options_apply(data_dir):
    data = load(data_dir, sources="amazon,movie", template="{sentence} =>", label_words=["no", "yes"],
                name="sent", balance=False)
    sources = {e["meta"]["source"] for e in data["train"] + data["test"]}
    assert sources == {"amazon", "movie"}
    assert all(e["prompt"].endswith(" =>") and e["candidates"] == ["no", "yes"] for e in data["train"])
    assert all(e["id"].startswith("sent/") for e in data["test"])


def test_repeated_texts_are_dropped_and_counted(tmp_path):
    path = write_snippets(tmp_path, "movie", MOVIE + [("41", 3.0, "movie line 1")])
    snippets, repeats = read_snippets(path, "movie")
    assert (len(snippets), repeats) == (40, 1)


@pytest.mark.parametrize("line, message", [
    ("41\t2.0", "expected 'id<TAB>rating<TAB>text', found 2 tab-separated fields"),
    ("41\tgood\tfine film", "rating 'good' is not a number"),
    ("41\t4.5\tfine film", "rating 4.5 is outside [-4, 4]"),
    ("41\t2.0\t  ", "empty text"),
    ("7\t2.0\tanother film", "id '7' already used on line 7"),
])
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / SOURCES["movie"]
    rows = "\n".join(f"{i}\t{r}\t{t}" for i, r, t in MOVIE)
    path.write_text(rows + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_sentiment_task({"data_dir": str(tmp_path), "sources": "movie"})
    assert str(e.value) == f"{path}:41: {message}"


def test_config_errors(data_dir):
    with pytest.raises(UserError, match=r"^task.sources='books': expected a comma-separated list of movie, amazon"):
        load(data_dir, sources="books")
    with pytest.raises(UserError, match=r"^task.margn: not a sentiment task key"):
        load(data_dir, margn=1.0)
    with pytest.raises(UserError, match=r"has no '\{sentence\}'"):
        load(data_dir, template="Review:")
    with pytest.raises(UserError) as e:
        load(data_dir, sources="tweets")
    assert str(e.value).startswith(f"{data_dir / SOURCES['tweets']}: no such snippet file")


def test_default_config_fields():
    cfg = default_task_config()
    assert (cfg.loader, cfg.margin, cfg.sources, tuple(cfg.label_words)) == (
        "sentiment", 0.5, "movie", (" negative", " positive"))
    assert cfg.template == "Review: {sentence}\nQuestion: Is this review positive or negative?\nAnswer:"


def test_jsonl_loads_through_the_nlp_sst2_formatter(data_dir, tmp_path):
    dst = tmp_path / "amazon.jsonl"
    counts = snippets_to_jsonl(data_dir / SOURCES["amazon"], dst)
    assert counts == {"written": 48, "ambiguous": 12, "repeated_texts": 0}
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert rows[0] == {"sentence": "review 1 sentence 1 & more", "label": 1, "id": "1_1", "rating": 1.5}
    data = nlp.load_nlp_task({"name": "sst2", "data_files": str(dst), "n_train": 0, "n_test": 0, "balance": False})
    examples = data["train"] + data["test"]
    assert len(examples) == 48
    by_text = {row["sentence"]: row["label"] for row in rows}
    assert all(by_text[e["prompt"]] == e["label"] for e in examples)
