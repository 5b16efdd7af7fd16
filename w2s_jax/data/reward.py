"""Pairwise preference (reward-modeling) tasks as Examples (see docs/CONTRACTS.md, scoring "reward").

An Example holds the conversation prefix shared by both responses in `prompt`, the two responses in
`candidates` (chosen and rejected, in a seeded coin-flip order) and the chosen one's index in `label`. The model
scores `prompt + candidate_k` with a scalar head and is right when the chosen response scores higher.

Tasks:
  - `anthropic_hh_pairwise`: Anthropic/hh-rlhf (columns chosen, rejected: whole transcripts). Each transcript is
    split after its last "\\n\\nAssistant:"; the prompt ends with that marker and the response is the rest (it
    starts with a space). Pairs are dropped, and counted in the log, when a transcript has no assistant turn,
    the two prompts differ, a response is empty, or both responses are the same.
  - `pairwise`: local files (or any Hub dataset) with columns prompt, chosen, rejected (responses only), or
    chosen, rejected only (then the prompt is "" and the candidates are the whole texts). Pairs with an empty
    or identical response are dropped.

Loading order, per split: rows in a permutation drawn from `seed`; pairs built and the order coin-flipped with
one `random.Random(seed)`; bad pairs dropped; pairs longer than `max_chars` dropped (prompt plus the longer
response; 0 = no limit); the first n kept (0 = all). Sources and `data_files` work as in `w2s_jax.data.nlp`.
"""
from __future__ import annotations

import collections
import itertools
import logging
import random
from typing import Iterator, Optional

import ml_collections

from w2s_jax.data import nlp

from w2s_jax.errors import UserError

log = logging.getLogger(__name__)

ASSISTANT = "\n\nAssistant:"

# name -> (hf_path, required columns)
TASKS = {
    "anthropic_hh_pairwise": ("Anthropic/hh-rlhf", ("chosen", "rejected")),
    "pairwise": ("", ("chosen", "rejected")),
}


def default_task_config(name: str) -> ml_collections.ConfigDict:
    if name not in TASKS:
        raise UserError(f"unknown reward task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return ml_collections.ConfigDict(dict(
        name=name,
        loader="reward",
        hf_path=TASKS[name][0],
        hf_name="",
        data_files="",                 # "" | "PATH" | "train=PATH,test=PATH" (globs allowed)
        test_fraction=0.2,             # share of a single data file that becomes the test split
        train_split="train",
        test_split="test",
        n_train=20000,                 # 0 = all
        n_test=10000,                  # 0 = all
        max_chars=0,                   # 0 = no limit
        seed=0,
        scoring="reward",
    ))


def split_transcript(text: str) -> Optional[tuple[str, str]]:
    """(prefix up to and including the last "\\n\\nAssistant:", final response) or None without such a turn."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        return None
    end = cut + len(ASSISTANT)
    return text[:end], text[end:]


def hh_pair(row: dict) -> tuple[Optional[tuple[str, str, str]], str]:
    """((prompt, chosen, rejected), "") for a usable hh-rlhf row, else (None, why it was dropped)."""
    chosen, rejected = split_transcript(row["chosen"] or ""), split_transcript(row["rejected"] or "")
    if chosen is None or rejected is None:
        return None, "no assistant turn"
    if chosen[0] != rejected[0]:
        return None, "prompts differ"
    return _checked(chosen[0], chosen[1], rejected[1])


def generic_pair(row: dict) -> tuple[Optional[tuple[str, str, str]], str]:
    return _checked(row.get("prompt") or "", row["chosen"] or "", row["rejected"] or "")


def _checked(prompt: str, chosen: str, rejected: str):
    if not chosen.strip() or not rejected.strip():
        return None, "empty response"
    if chosen == rejected:
        return None, "identical responses"
    return (prompt, chosen, rejected), ""


def coin_flip_order(rng: random.Random, chosen: str, rejected: str) -> tuple[list[str], int]:
    """Candidates in a random order, and the index of the chosen one."""
    if rng.random() < 0.5:
        return [chosen, rejected], 0
    return [rejected, chosen], 1


def pairs(rows: Iterator[tuple[int, dict]], make_pair, seed: int, max_chars: int,
          dropped: collections.Counter) -> Iterator[tuple[int, str, list[str], int]]:
    """(source_index, prompt, candidates, label) for each usable row; counts the rows left out in `dropped`."""
    rng = random.Random(seed)
    for source_index, row in rows:
        pair, why = make_pair(row)
        if pair is None:
            dropped[why] += 1
            continue
        prompt, chosen, rejected = pair
        candidates, label = coin_flip_order(rng, chosen, rejected)
        if max_chars > 0 and len(prompt) + max(len(c) for c in candidates) > max_chars:
            dropped["longer than max_chars"] += 1
            continue
        yield source_index, prompt, candidates, label


def load_reward_task(task_cfg) -> dict[str, list[dict]]:
    """{"train": [Example], "test": [Example]} of preference pairs (order and options: module docstring)."""
    cfg = nlp.with_defaults(task_cfg, default_task_config)
    _, columns = TASKS[cfg.name]
    make_pair = hh_pair if cfg.name == "anthropic_hh_pairwise" else generic_pair
    sources = nlp.load_source_splits(cfg, columns)
    result = {}
    for role, n in (("train", cfg.n_train), ("test", cfg.n_test)):
        split = sources[role]
        dropped = collections.Counter()
        stream = pairs(nlp.shuffled_rows(split, cfg.seed), make_pair, cfg.seed, cfg.max_chars, dropped)
        kept = list(itertools.islice(stream, n)) if n > 0 else list(stream)
        if dropped:
            log.warning("task %s: dropped %d %s pairs from %s: %s", cfg.name, sum(dropped.values()), role,
                        split.origin, dict(dropped))
        if not kept:
            raise UserError(f"task {cfg.name!r}: no {role} pairs left from {split.origin}; dropped {dict(dropped)}")
        result[role] = [
            {"id": f"{cfg.name}/{role}/{source_index}", "prompt": prompt, "candidates": candidates, "label": label,
             "meta": {"source_index": source_index, "source_split": split.split}}
            for source_index, prompt, candidates, label in kept
        ]
    return result
