"""bench/after_torch.py: each timed step of ours follows the step it is labelled after, and the paired differences
are taken round by round."""
import pytest

from bench import after_torch


def test_rounds_time_ours_after_ours_and_after_theirs():
    log = []

    def ours():
        log.append("ours")

    def theirs():
        log.append("theirs")

    calls = after_torch.paired_rounds(ours, theirs, pairs=2, warmup=1)
    assert log == ["ours", "theirs"] + ["ours", "ours", "theirs", "ours"] * 2
    assert [len(calls[k]) for k in after_torch.KINDS] == [2, 2, 2]
    assert calls["difference_s"] == [b["s"] - a["s"] for a, b in zip(calls["after ours"], calls["after torch"])]
    lines = after_torch.summary_lines(calls)
    assert lines[0].startswith("after ours :") and lines[-1].startswith("after torch - after ours, per round:")


def test_bad_counts_are_named(capsys):
    with pytest.raises(SystemExit):
        after_torch.parse_args(["--pairs=0"])
    assert "--pairs=0: expected at least 1" in capsys.readouterr().err
