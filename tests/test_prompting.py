"""Zero/few-shot prompt strings and shot picking."""
import collections

import pytest

from w2s_jax.data import prompting

TEMPLATE, WORDS = prompting.default_template("sciq")


def example(i, label, prompt=None):
    return {"id": f"sciq/train/{i}", "prompt": prompt or f"Q: q{i}? A: a{i}", "candidates": ["0", "1"],
            "label": label, "meta": {"source_index": i}}


def test_sciq_default_template():
    assert (TEMPLATE, WORDS) == ("{prompt}\nIs the answer correct? Answer:", (" No", " Yes"))
    assert prompting.default_template("some_new_task") == ("{prompt}\nAnswer:", (" No", " Yes"))
    assert prompting.default_template("sst2") == ("{prompt}\nSentiment:", (" negative", " positive"))


def test_zero_shot_exact():
    query = example(5, 1, "Q: What do plants make? A: sugar")
    out = prompting.zero_shot_example(query, TEMPLATE, WORDS)
    assert out == {"id": "sciq/train/5", "prompt": "Q: What do plants make? A: sugar\nIs the answer correct? Answer:",
                   "candidates": [" No", " Yes"], "label": 1, "meta": {"source_index": 5}}
    out["meta"]["x"] = 1
    assert query["meta"] == {"source_index": 5} and query["prompt"] == "Q: What do plants make? A: sugar"


def test_few_shot_exact():
    shots = [example(1, 1, "Q: What do plants make? A: sugar"), example(2, 0, "Q: What gas do we exhale? A: helium")]
    query = example(9, 0, "Q: What is ice? A: fire")
    out = prompting.few_shot_example(query, shots, TEMPLATE, WORDS, separator="\n\n")
    assert out["prompt"] == ("Q: What do plants make? A: sugar\nIs the answer correct? Answer: Yes\n\n"
                             "Q: What gas do we exhale? A: helium\nIs the answer correct? Answer: No\n\n"
                             "Q: What is ice? A: fire\nIs the answer correct? Answer:")
    assert out["candidates"] == [" No", " Yes"] and out["label"] == 0
    assert out["meta"] == {"source_index": 9, "shot_ids": ["sciq/train/1", "sciq/train/2"]}


def test_braces_in_a_prompt_are_kept_and_bad_templates_are_reported():
    assert prompting.zero_shot_example(example(0, 0, "f(x) = {x}"), "{prompt}:", WORDS)["prompt"] == "f(x) = {x}:"
    with pytest.raises(ValueError, match="exactly one field"):
        prompting.zero_shot_example(example(0, 0), "{prompt} {answer}", WORDS)
    with pytest.raises(ValueError, match="label 2 has no label word"):
        prompting.zero_shot_example(example(0, 2), TEMPLATE, WORDS)


POOL = [example(i, int(i < 4)) for i in range(20)]   # 4 of class 1, 16 of class 0


def test_pick_shots_is_deterministic_and_balanced():
    shots = prompting.pick_shots(POOL, 6, seed=0)
    assert shots == prompting.pick_shots(POOL, 6, seed=0)
    assert collections.Counter(s["label"] for s in shots) == {0: 3, 1: 3}
    assert len({s["id"] for s in shots}) == 6
    assert [s["id"] for s in prompting.pick_shots(POOL, 6, seed=1)] != [s["id"] for s in shots]
    # class 1 runs out after 4: the rest come from class 0
    assert collections.Counter(s["label"] for s in prompting.pick_shots(POOL, 10, seed=0)) == {0: 6, 1: 4}
    odd = collections.Counter(s["label"] for s in prompting.pick_shots(POOL, 5, seed=3))
    assert sorted(odd.values()) == [2, 3]


def test_pick_shots_unbalanced_and_errors():
    shots = prompting.pick_shots(POOL, 20, seed=0, balanced=False)
    assert sorted(s["id"] for s in shots) == sorted(s["id"] for s in POOL)
    with pytest.raises(ValueError, match="asked for 21 shots from a pool of 20"):
        prompting.pick_shots(POOL, 21, seed=0)
