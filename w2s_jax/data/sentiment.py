"""Human-rated sentiment snippets (Hutto & Gilbert, ICWSM 2014: VADER's ground truth) as Examples.

Four files of sentence-level snippets, each rated from -4 to +4 by about 20 people (see docs/ASSETS.md):

    movie   movieReviewSnippets_GroundTruth.txt    10,605 sentences from rottentomatoes.com reviews
    amazon  amazonReviewSnippets_GroundTruth.txt    3,708 sentences from 309 Amazon product reviews
    tweets  tweets_GroundTruth.txt                  4,200 tweets
    nyt     nytEditorialSnippets_GroundTruth.txt    5,190 sentences from 500 New York Times editorials

A line is `id<TAB>mean rating<TAB>text`. label 1 (positive) if the mean rating is > 0, else 0. A snippet whose
|mean| is below `margin` is one the raters did not agree on: it is dropped and counted.

Loading order (`load_sentiment_task`), for each source file:
  1. parse every line (a bad line is a UserError naming file:line); HTML entities in the text are unescaped (the
     tweets have `&amp;`); a text seen before in the file is dropped and counted (it would leak across splits);
  2. split by document with the fixed `SPLIT_SEED`, never the run's seed, so the test pool never moves: amazon ids
     `12_3` and nyt ids `7_15` are sentence 3 of review 12 and sentence 15 of article 7, and a document's sentences
     stay on one side (each Example's `group`, which the pipeline's halves keep together too); movie and tweet ids
     name no document, so each snippet is its own. The first documents of a permutation take `test_fraction` of
     the snippets;
  3. drop ambiguous snippets (|rating| < margin) on both sides, counting them.
Then over all chosen sources: the test pool is visited in a `SPLIT_SEED` permutation and the train pool in a
`seed` permutation; each is balanced to 50/50 (if `balance`) and cut to `n_test` / `n_train` (0 = all). The
pipeline then splits the train examples in halves per run seed. With `corpus_sources`, the texts of every snippet
on the train side of those files (rated or ambiguous, without the ratings) are the pretraining corpus of the models
pretrained here: no test document is in it.

Ids are `"{name}/{source}/{snippet id}"`: one id names one line of one file under every seed and option.
"""
from __future__ import annotations

import dataclasses
import html
import json
import logging
import os
from pathlib import Path

import ml_collections
import numpy as np

from w2s_jax.data.nlp import balanced_prefix
from w2s_jax.errors import UserError

log = logging.getLogger(__name__)

SPLIT_SEED = 0
SOURCES = {
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
DEFAULT_TEMPLATE = "Review: {sentence}\nQuestion: Is this review positive or negative?\nAnswer:"
MAX_RATING = 4.0


def default_task_config() -> ml_collections.ConfigDict:
    """The sentiment task's config (loading order: the module docstring)."""
    return ml_collections.ConfigDict(dict(
        name="sentiment",                # first part of every Example id
        loader="sentiment",
        data_dir="",                     # folder with the *_GroundTruth.txt files; "" = the asset cache (fetched
                                         # on first use: `python -m w2s_jax.assets sentiment`)
        sources="movie",                 # comma-separated: movie, amazon, tweets, nyt; or "all"
        margin=0.5,                      # drop snippets with |mean rating| < margin (0 = keep all but exact 0.0)
        test_fraction=0.2,               # share of each file's snippets (whole documents) in the fixed test pool
        n_train=0,                       # train examples to keep after balancing (0 = the whole train pool)
        n_test=0,                        # test examples to keep after balancing (0 = the whole test pool)
        balance=True,                    # undersample each split to 50/50 positive/negative
        template=DEFAULT_TEMPLATE,       # the prompt; `{sentence}` is replaced by the snippet's text
        label_words=(" negative", " positive"),  # the candidates: label 0, label 1
        seed=0,                          # order of the train pool, so which examples n_train keeps (never the test)
        scoring="classify",              # how candidates are scored (docs/CONTRACTS.md)
        max_len=160,                     # longest prompt in tokens; longer examples are dropped by the pipeline
        corpus_sources="",               # unlabelled pretraining text for `source='pretrain'` models: the train side
                                         # of these files (ratings unused, never a test document); "" = none
    ))


@dataclasses.dataclass(frozen=True)
class Snippet:
    source: str     # "movie", "amazon", "tweets", "nyt"
    id: str         # as in the file
    rating: float   # mean human rating, -4..+4
    text: str
    line: int       # 1-based line in the file

    @property
    def document(self) -> str:
        """Snippets of one review or article share the id's part before "_"; other ids are their own document."""
        return f"{self.source}/{self.id.split('_', 1)[0]}"


def parse_sources(spec: str, key: str = "sources") -> list[str]:
    names = list(SOURCES) if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [name for name in names if name not in SOURCES]
    if unknown or not names:
        raise UserError(f"task.{key}={spec!r}: expected a comma-separated list of {', '.join(SOURCES)} or 'all'")
    return list(dict.fromkeys(names))


def read_snippets(path: str | os.PathLike, source: str) -> tuple[list[Snippet], int]:
    """Every snippet of one file, in file order, and how many repeated texts were dropped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such snippet file (fetch them with `python -m w2s_jax.assets sentiment`)")
    snippets, seen_ids, seen_texts, repeats = [], {}, set(), 0
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise UserError(f"{where}: expected 'id<TAB>rating<TAB>text', found {len(fields)} tab-separated fields")
        snippet_id, rating_text, text = fields[0].strip(), fields[1].strip(), html.unescape(fields[2]).strip()
        try:
            rating = float(rating_text)
        except ValueError:
            raise UserError(f"{where}: rating {rating_text!r} is not a number") from None
        if not -MAX_RATING <= rating <= MAX_RATING:
            raise UserError(f"{where}: rating {rating} is outside [-4, 4]")
        if not snippet_id or not text:
            raise UserError(f"{where}: empty {'id' if not snippet_id else 'text'}")
        if snippet_id in seen_ids:
            raise UserError(f"{where}: id {snippet_id!r} already used on line {seen_ids[snippet_id]}")
        seen_ids[snippet_id] = number
        if text in seen_texts:
            repeats += 1
            continue
        seen_texts.add(text)
        snippets.append(Snippet(source, snippet_id, rating, text, number))
    if not snippets:
        raise UserError(f"{path}: no snippets")
    return snippets, repeats


def split_by_document(snippets: list[Snippet], test_fraction: float) -> tuple[list[Snippet], list[Snippet]]:
    """(train, test) in file order: whole documents, in a SPLIT_SEED permutation, fill the test share first."""
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"task.test_fraction={test_fraction}: must be in (0, 1)")
    documents = list(dict.fromkeys(s.document for s in snippets))
    size = {d: 0 for d in documents}
    for s in snippets:
        size[s.document] += 1
    wanted, taken, test_documents = test_fraction * len(snippets), 0, set()
    for k in np.random.default_rng(SPLIT_SEED).permutation(len(documents)):
        if taken >= wanted:
            break
        test_documents.add(documents[k])
        taken += size[documents[k]]
    train = [s for s in snippets if s.document not in test_documents]
    test = [s for s in snippets if s.document in test_documents]
    return train, test


def label_of(snippet: Snippet) -> int:
    return int(snippet.rating > 0)


def _example(cfg, snippet: Snippet) -> dict:
    return {"id": f"{cfg.name}/{snippet.source}/{snippet.id}",
            "prompt": cfg.template.format(sentence=snippet.text),
            "candidates": list(cfg.label_words),
            "label": label_of(snippet),
            "group": snippet.document,
            "meta": {"source": snippet.source, "snippet_id": snippet.id, "rating": snippet.rating,
                     "line": snippet.line}}


def _with_defaults(task_cfg) -> ml_collections.ConfigDict:
    """The defaults overridden by the caller's keys; an unknown key is an error (a typo would pass silently)."""
    given = task_cfg.to_dict() if hasattr(task_cfg, "to_dict") else dict(task_cfg)
    cfg = default_task_config()
    for key, value in given.items():
        if key not in cfg:
            raise UserError(f"task.{key}: not a sentiment task key (keys: {', '.join(sorted(cfg))})")
        cfg[key] = value
    return cfg


def _choose(snippets: list[Snippet], seed: int, n: int, balance: bool) -> list[Snippet]:
    order = [snippets[k] for k in np.random.default_rng(seed).permutation(len(snippets))]
    if balance:
        return balanced_prefix(order, n, label_of)
    return order[:n] if n > 0 else order


def load_sentiment_task(task_cfg) -> dict:
    """{"train": [Example], "test": [Example], "notes": [str], "counts": {...}} (order: the module docstring).

    `counts` says how many snippets each step kept or dropped; `notes` says it in a line for the run's report.
    """
    cfg = _with_defaults(task_cfg)
    if "{sentence}" not in cfg.template:
        raise UserError(f"task.template={cfg.template!r} has no '{{sentence}}' to put the snippet in")
    if len(cfg.label_words) != 2:
        raise UserError(f"task.label_words={tuple(cfg.label_words)!r}: expected 2 words (negative, positive)")
    if cfg.margin < 0:
        raise UserError(f"task.margin={cfg.margin}: must be >= 0")
    folder = Path(cfg.data_dir).expanduser() if cfg.data_dir else None
    if folder is None:
        from w2s_jax import assets
        folder = assets.sentiment_snippets()
    pools = {"train": [], "test": []}
    counts = {"snippets": 0, "repeated_texts": 0, "ambiguous": {"train": 0, "test": 0}}
    for source in parse_sources(cfg.sources):
        snippets, repeats = read_snippets(folder / SOURCES[source], source)
        counts["snippets"] += len(snippets) + repeats
        counts["repeated_texts"] += repeats
        for role, part in zip(("train", "test"), split_by_document(snippets, cfg.test_fraction)):
            clear = [s for s in part if abs(s.rating) >= cfg.margin and s.rating != 0]
            counts["ambiguous"][role] += len(part) - len(clear)
            pools[role].extend(clear)
    chosen = {"test": _choose(pools["test"], SPLIT_SEED, cfg.n_test, cfg.balance),
              "train": _choose(pools["train"], cfg.seed, cfg.n_train, cfg.balance)}
    for role, n in (("train", cfg.n_train), ("test", cfg.n_test)):
        counts[f"{role}_pool"] = len(pools[role])
        counts[role] = len(chosen[role])
        if not chosen[role]:
            raise UserError(f"task {cfg.name!r}: no {role} examples left from {cfg.sources} after margin="
                            f"{cfg.margin} and balance={cfg.balance}")
        if n > 0 and len(chosen[role]) < n:
            log.warning("task %s: only %d %s examples (asked for %d)", cfg.name, len(chosen[role]), role, n)
    ambiguous = sum(counts["ambiguous"].values())
    note = (f"sentiment ({cfg.sources}): {counts['snippets']} rated snippets; dropped {ambiguous} with "
            f"|rating| < {cfg.margin} and {counts['repeated_texts']} repeated texts; kept {counts['train']} train "
            f"(of a pool of {counts['train_pool']}) and {counts['test']} test (of {counts['test_pool']})")
    log.info(note)
    data = {"train": [_example(cfg, s) for s in chosen["train"]],
            "test": [_example(cfg, s) for s in chosen["test"]],
            "notes": [note], "counts": counts}
    if cfg.corpus_sources:
        data["corpus"] = pretraining_corpus(folder, cfg.corpus_sources, cfg.test_fraction)
        data["notes"].append(f"pretraining corpus: {len(data['corpus'])} unrated sentences of the train side of "
                             f"{cfg.corpus_sources} (no test document)")
    return data


def pretraining_corpus(folder: Path, sources: str, test_fraction: float) -> list[str]:
    """The texts of every snippet on the train side of each source, ambiguous ones too: text without ratings."""
    texts = []
    for source in parse_sources(sources, "corpus_sources"):
        snippets, _ = read_snippets(folder / SOURCES[source], source)
        train, _ = split_by_document(snippets, test_fraction)
        texts.extend(s.text for s in train)
    return texts


def snippets_to_jsonl(src: str | os.PathLike, dst: str | os.PathLike, margin: float = 0.5) -> dict:
    """Write one snippet file as JSON lines `{"sentence", "label", "id", "rating"}`, the columns of nlp.py's `sst2`
    task, so the data also loads through the NLP loader (`task.name=sst2`, `task.data_files=DST`). That path
    splits rows, not documents, and uses no prompt template. Returns the counts written and dropped."""
    src = Path(src)
    source = next((name for name, file in SOURCES.items() if file == src.name), src.stem)
    snippets, repeats = read_snippets(src, source)
    kept = [s for s in snippets if abs(s.rating) >= margin and s.rating != 0]
    with open(dst, "w", encoding="utf-8") as out:
        for s in kept:
            row = {"sentence": s.text, "label": label_of(s), "id": s.id, "rating": s.rating}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"written": len(kept), "ambiguous": len(snippets) - len(kept), "repeated_texts": repeats}
