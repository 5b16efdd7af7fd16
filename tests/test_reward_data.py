"""Pairwise preference loaders: hh-rlhf prefix split, coin-flip order, options and errors (offline fixtures)."""
import json
import logging

import pandas as pd
import pytest

from w2s_jax.data import reward


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def config(name, **overrides):
    cfg = reward.default_task_config(name)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


MULTI_TURN = {
    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross?",
    "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: No.",
}


def hh_rows(n):
    return [{"chosen": f"\n\nHuman: Question {i}?\n\nAssistant: Good answer {i}.",
             "rejected": f"\n\nHuman: Question {i}?\n\nAssistant: Bad answer {i}."} for i in range(n)]


def test_split_at_the_last_assistant_turn():
    assert reward.split_transcript(MULTI_TURN["chosen"]) == (
        "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant:", " Why did the chicken cross?")
    assert reward.hh_pair(MULTI_TURN) == (
        ("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant:",
         " Why did the chicken cross?", " No."), "")


@pytest.mark.parametrize("row,why", [
    ({"chosen": "\n\nHuman: A?\n\nAssistant: x", "rejected": "\n\nHuman: B?\n\nAssistant: y"}, "prompts differ"),
    ({"chosen": "\n\nHuman: A?", "rejected": "\n\nHuman: A?\n\nAssistant: y"}, "no assistant turn"),
    ({"chosen": "\n\nHuman: A?\n\nAssistant: same", "rejected": "\n\nHuman: A?\n\nAssistant: same"},
     "identical responses"),
    ({"chosen": "\n\nHuman: A?\n\nAssistant: ", "rejected": "\n\nHuman: A?\n\nAssistant: y"}, "empty response"),
])
def test_unusable_hh_pairs_say_why(row, why):
    assert reward.hh_pair(row) == (None, why)


def test_hh_examples_point_at_the_chosen_response_in_a_seeded_order(tmp_path, caplog):
    rows = hh_rows(30) + [{"chosen": "\n\nHuman: A?\n\nAssistant: x", "rejected": "\n\nHuman: B?\n\nAssistant: y"}]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    cfg = config("anthropic_hh_pairwise", data_files=f"train={path},test={path}", n_train=0, n_test=5)
    with caplog.at_level(logging.WARNING):
        out = reward.load_reward_task(cfg)
    assert "dropped 1 train pairs" in caplog.text and "'prompts differ': 1" in caplog.text
    assert len(out["train"]) == 30 and len(out["test"]) == 5
    for e in out["train"]:
        i = e["meta"]["source_index"]
        assert e["id"] == f"anthropic_hh_pairwise/train/{i}"
        assert e["prompt"] == f"\n\nHuman: Question {i}?\n\nAssistant:"
        assert e["candidates"][e["label"]] == f" Good answer {i}."
        assert e["candidates"][1 - e["label"]] == f" Bad answer {i}."
    assert {e["label"] for e in out["train"]} == {0, 1}
    assert json.dumps(out) == json.dumps(reward.load_reward_task(cfg))
    cfg.seed = 1
    other = reward.load_reward_task(cfg)
    assert [e["id"] for e in other["train"]] != [e["id"] for e in out["train"]]


def test_coin_flip_order():
    class Coin:
        def __init__(self, value):
            self.value = value

        def random(self):
            return self.value

    assert reward.coin_flip_order(Coin(0.25), "good", "bad") == (["good", "bad"], 0)
    assert reward.coin_flip_order(Coin(0.75), "good", "bad") == (["bad", "good"], 1)


def test_generic_pairwise_with_a_prompt_column_from_csv(tmp_path):
    rows = [{"prompt": f"Say hi {i}:", "chosen": f" hi {i}", "rejected": f" bye {i}"} for i in range(6)]
    path = tmp_path / "prefs.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    out = reward.load_reward_task(config("pairwise", data_files=f"train={path},test={path}", n_train=4, n_test=0))
    assert len(out["train"]) == 4 and len(out["test"]) == 6
    for e in out["train"]:
        i = e["meta"]["source_index"]
        assert e["prompt"] == f"Say hi {i}:"
        assert e["candidates"][e["label"]] == f" hi {i}" and e["candidates"][1 - e["label"]] == f" bye {i}"


def test_generic_pairwise_without_a_prompt_column_uses_whole_texts(tmp_path):
    rows = [{"chosen": f"good text {i}", "rejected": f"bad text {i}"} for i in range(5)]
    path = tmp_path / "prefs.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    out = reward.load_reward_task(config("pairwise", data_files=f"train={path},test={path}", n_train=0, n_test=0))
    assert sorted((e["prompt"], e["candidates"][e["label"]]) for e in out["train"]) == [
        ("", f"good text {i}") for i in range(5)]


def test_max_chars_drops_long_pairs(tmp_path):
    rows = [{"prompt": "P:", "chosen": "a" * i, "rejected": "b"} for i in range(2, 8)]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    out = reward.load_reward_task(config("pairwise", data_files=f"train={path},test={path}", n_train=0, max_chars=6))
    # prompt (2 chars) + longer response (i chars) <= 6 keeps i in 2..4, source indices 0..2
    assert sorted(e["meta"]["source_index"] for e in out["train"]) == [0, 1, 2]


def test_unknown_reward_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown reward task 'hh'; known tasks: anthropic_hh_pairwise, pairwise"):
        reward.default_task_config("hh")


def test_missing_column_and_missing_source(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": "a", "rejected_text": "b"}])
    with pytest.raises(ValueError, match=r"prefs.jsonl: column 'rejected' needed by task 'pairwise' is missing; "
                                         r"columns present: \['prompt', 'chosen', 'rejected_text'\]"):
        reward.load_reward_task(config("pairwise", data_files=f"train={path},test={path}"))
    with pytest.raises(ValueError, match="set data_files"):
        reward.load_reward_task(config("pairwise"))
    with pytest.raises(FileNotFoundError, match="data_files: no file matches"):
        reward.load_reward_task(config("anthropic_hh_pairwise", data_files=str(tmp_path / "none.jsonl")))
