"""Turn Examples into padded numpy batches for the three scorings (see docs/CONTRACTS.md).

Examples are tokenized once (`encode_examples`); batches are padded to bucketed lengths so that jit compiles a
handful of shapes, not one per batch. Everything here is host-side numpy.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

SCORINGS = ("classify", "choice_lm", "reward")


def bucket(n: int, multiple: int = 32) -> int:
    """Round a length up to a multiple of `multiple` (up to 32 multiples), beyond that to a power of two: few
    distinct shapes (few compiles) and little padding."""
    if n <= 32 * multiple:
        return max(multiple, int(math.ceil(n / multiple)) * multiple)
    return 1 << int(math.ceil(math.log2(n)))


def _ids(tokenizer, text: str, add_bos: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def encode_examples(examples: Sequence[dict], tokenizer, scoring: str, max_len: int, add_bos: bool = True):
    """Tokenize examples; drop (never truncate) those whose model input would exceed max_len tokens.

    Returns (encoded, dropped_ids). Each encoded item keeps the example's index in `src`.
    """
    if scoring not in SCORINGS:
        raise ValueError(f"task.scoring={scoring!r}: expected one of {SCORINGS}")
    encoded, dropped = [], []
    for i, ex in enumerate(examples):
        prompt = _ids(tokenizer, ex["prompt"], add_bos)
        cands = [_ids(tokenizer, c, False) for c in ex["candidates"]]
        if scoring == "classify":
            length = len(prompt)
        elif scoring == "reward":
            length = len(prompt) + max(len(c) for c in cands)
        else:
            if any(len(c) == 0 for c in cands):
                raise ValueError(f"example {ex['id']!r}: a candidate tokenizes to nothing: {ex['candidates']}")
            length = len(prompt) + sum(len(c) for c in cands)
        if length > max_len:
            dropped.append(ex["id"])
            continue
        encoded.append({"src": i, "prompt": prompt, "cands": cands, "length": length})
    if dropped:
        log.info("dropped %d of %d examples longer than max_len=%d tokens", len(dropped), len(examples), max_len)
    return encoded, dropped


def collate(items: Sequence[dict], scoring: str, targets: np.ndarray | None = None, batch_size: int | None = None,
            num_candidates: int | None = None, seq_len: int | None = None, num_scored: int | None = None) -> dict:
    """Pad encoded items into one batch dict of numpy arrays.

    Rows beyond len(items) (to fill `batch_size`) have `example_mask` 0. `targets` are [len(items), K] probabilities.
    Shapes default to bucketed maxima of the items.
    """
    n = len(items)
    b = batch_size or n
    k = num_candidates or candidate_count(items, scoring)
    out = {"cand_mask": np.zeros((b, k), bool), "targets": np.zeros((b, k), np.float32),
           "example_mask": np.zeros((b,), bool)}
    out["example_mask"][:n] = True
    for r, it in enumerate(items):
        out["cand_mask"][r, :len(it["cands"])] = True
    if targets is not None:
        out["targets"][:n, :targets.shape[1]] = targets[:, :k]

    if scoring == "classify":
        l = seq_len or seq_bucket(items)
        ids, mask, last = np.zeros((b, l), np.int32), np.zeros((b, l), np.int32), np.zeros((b,), np.int32)
        for r, it in enumerate(items):
            ids[r, :len(it["prompt"])] = it["prompt"]
            mask[r, :len(it["prompt"])] = 1
            last[r] = len(it["prompt"]) - 1
        out.update(input_ids=ids, attention_mask=mask, last_index=last)
        if "states" in items[0]:  # a top-layers model's input (top_layers.py): the prompt's hidden states
            embeds = np.zeros((b, l, items[0]["states"].shape[-1]), np.float32)
            for r, it in enumerate(items):
                embeds[r, :len(it["prompt"])] = it["states"]
            out["inputs_embeds"] = embeds
    elif scoring == "reward":
        l = seq_len or seq_bucket(items)
        ids, mask = np.zeros((b, k, l), np.int32), np.zeros((b, k, l), np.int32)
        last = np.zeros((b, k), np.int32)
        for r, it in enumerate(items):
            for c, cand in enumerate(it["cands"]):
                seq = it["prompt"] + cand
                ids[r, c, :len(seq)] = seq
                mask[r, c, :len(seq)] = 1
                last[r, c] = len(seq) - 1
        out.update(input_ids=ids, attention_mask=mask, last_index=last)
    else:  # choice_lm: the prompt once, then every candidate packed after it (own segment, positions restart)
        l = seq_len or seq_bucket(items)
        t = num_scored or bucket(max(sum(len(c) for c in it["cands"]) for it in items), 16)
        ids, mask = np.zeros((b, l), np.int32), np.zeros((b, l), np.int32)
        pos, seg = np.zeros((b, l), np.int32), np.zeros((b, l), np.int32)
        src, tok = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
        cand = np.full((b, t), -1, np.int32)
        for r, it in enumerate(items):
            p = len(it["prompt"])
            ids[r, :p], mask[r, :p], pos[r, :p] = it["prompt"], 1, np.arange(p)
            at, j = p, 0
            for c, cids in enumerate(it["cands"]):
                m = len(cids)
                ids[r, at:at + m], mask[r, at:at + m] = cids, 1
                pos[r, at:at + m], seg[r, at:at + m] = np.arange(p, p + m), c + 1
                # token q of candidate c is predicted by the logits at the previous token of its own sequence
                src[r, j:j + m] = [p - 1] + list(range(at, at + m - 1))
                tok[r, j:j + m], cand[r, j:j + m] = cids, c
                at, j = at + m, j + m
        out.update(input_ids=ids, attention_mask=mask, positions=pos, segment_ids=seg,
                   score_src=src, score_tok=tok, score_cand=cand)
    return out


def prediction_batches(encoded: Sequence[dict], batch_size: int):
    """Yield (positions in `encoded`, items) in length order, so that each batch pads only to its own length."""
    order = sorted(range(len(encoded)), key=lambda i: encoded[i]["length"])
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        yield idx, [encoded[i] for i in idx]


def pack_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """Indices of `lengths` packed into rows of at most `row_len` tokens: best fit, longest first, so that rows are
    nearly full and a forward pass over them computes little padding. Deterministic."""
    too_long = [n for n in lengths if n > row_len]
    if too_long:
        raise ValueError(f"pack_rows: a sequence of {max(too_long)} tokens does not fit rows of {row_len}")
    rows: list[list[int]] = []
    with_room: list[list[int]] = [[] for _ in range(row_len + 1)]  # with_room[c]: the rows with c free places
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        room = next((c for c in range(n, row_len + 1) if with_room[c]), None)
        if room is None:
            rows.append([])
            r, room = len(rows) - 1, row_len
        else:
            r = with_room[room].pop()
        rows[r].append(i)
        with_room[room - n].append(r)
    return rows


def collate_packed(prompts: Sequence[Sequence[int]], rows: Sequence[Sequence[int]], row_len: int, batch_rows: int,
                   segments: int) -> dict:
    """One batch of packed rows (`pack_rows`) of independent prompts, [batch_rows, row_len]: input_ids,
    attention_mask, positions (restarting at 0 for each prompt) and segment_ids (1, 2, ... along a row, 0 for
    padding), so that every token attends only to its own prompt; and last_index [batch_rows, segments], each
    prompt's last token in its row in the order of `rows` (0 where a row holds fewer)."""
    shape = (batch_rows, row_len)
    ids, mask, pos, seg = (np.zeros(shape, np.int32) for _ in range(4))
    last = np.zeros((batch_rows, segments), np.int32)
    for r, row in enumerate(rows):
        at = 0
        for s, i in enumerate(row):
            n = len(prompts[i])
            ids[r, at:at + n], mask[r, at:at + n] = prompts[i], 1
            pos[r, at:at + n], seg[r, at:at + n] = np.arange(n), s + 1
            last[r, s] = at + n - 1
            at += n
    return {"input_ids": ids, "attention_mask": mask, "positions": pos, "segment_ids": seg, "last_index": last}


def packed_batches(prompts: Sequence[Sequence[int]], batch_rows: int):
    """Yield (rows, batch) over `prompts` packed into rows (`pack_rows`, `collate_packed`), `batch_rows` rows a
    batch; `rows[r]` lists the indices into `prompts` that row r holds.

    Prompts are first split by length class (up to 128 tokens, then up to each power of two), and each class packs
    into rows as long as its longest prompt, rounded up to 32: a token's attention spans its whole row, so one
    long prompt does not make the rows of many short ones long. One shape per class, so few compilations."""
    classes: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        classes.setdefault(max(128, 1 << (len(p) - 1).bit_length()), []).append(i)
    for members in classes.values():
        lengths = [len(prompts[i]) for i in members]
        row_len = bucket(max(lengths), 32)
        rows = [[members[j] for j in row] for row in pack_rows(lengths, row_len)]
        segments = max(map(len, rows))
        for s in range(0, len(rows), batch_rows):
            chunk = rows[s:s + batch_rows]
            yield chunk, collate_packed(prompts, chunk, row_len, batch_rows, segments)


def seq_bucket(items: Sequence[dict], multiple: int = 128) -> int:
    """Padded sequence length for a batch: its longest item, rounded up to a multiple of `multiple` (128: few
    compiles of a train step; a forward pass over length-sorted batches pads less with 32)."""
    return bucket(max(it["length"] for it in items), multiple)


def candidate_count(items: Sequence[dict], scoring: str) -> int:
    """K for a batch: the classes / responses exactly, or the legal moves bucketed to a multiple of 8."""
    k = max(len(it["cands"]) for it in items)
    return bucket(k, 8) if scoring == "choice_lm" else k


def max_shapes(encoded: Sequence[dict], scoring: str) -> tuple[int, int, int]:
    """(candidates, sequence length, scored tokens), bucketed, that fit every item."""
    k = candidate_count(encoded, scoring)
    l = seq_bucket(encoded)
    t = bucket(max(sum(len(c) for c in e["cands"]) for e in encoded), 16)
    return k, l, t


def epoch_order(n: int, batch_size: int, seed: int, epochs: float | None = None, steps: int | None = None,
                lengths: Sequence[int] | None = None, group: int = 0) -> np.ndarray:
    """Example indices for every full training batch: a fresh permutation per epoch, [steps, batch_size].

    Give `epochs` (steps = n * epochs // batch_size, as the reference) or `steps`. With `lengths` and `group` > 0,
    batches are grouped by length: each run of `group` batches of the shuffled stream is sorted by length, cut
    into batches, and those batches are shuffled, so a batch pads to its own length instead of the longest
    example's (attention cost grows with the square of it). The order depends only on the arguments, so a resumed
    run sees exactly the same batches.
    """
    if n < batch_size:
        raise ValueError(f"only {n} training examples for batch_size={batch_size}")
    if steps is None:
        steps = int(n * epochs) // batch_size
    epochs = steps * batch_size / n
    rng = np.random.default_rng(seed)
    stream = np.concatenate([rng.permutation(n) for _ in range(int(math.ceil(epochs)) + 1)])
    batches = stream[:steps * batch_size].reshape(steps, batch_size)
    if lengths is None or group <= 1:
        return batches
    lengths = np.asarray(lengths)
    out = []
    for s in range(0, steps, group):
        chunk = batches[s:s + group].reshape(-1)
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")].reshape(-1, batch_size)
        out.append(chunk[rng.permutation(len(chunk))])
    return np.concatenate(out)


def lm_blocks(token_lists: Sequence[Sequence[int]], seq_len: int, eos_id: int) -> np.ndarray:
    """Concatenate documents (each followed by eos) and cut them into [n, seq_len + 1] blocks for LM training."""
    flat = np.fromiter((t for ids in token_lists for t in (*ids, eos_id)), dtype=np.int32)
    n = len(flat) // (seq_len + 1)
    if n == 0:
        raise ValueError(f"corpus of {len(flat)} tokens is shorter than one block of {seq_len + 1}")
    return flat[:n * (seq_len + 1)].reshape(n, seq_len + 1)
