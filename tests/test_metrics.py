"""Metrics arithmetic on small hand cases, prediction files, and the metric writer."""
import json
import os

import numpy as np
import pytest

from w2s_jax import metrics
from w2s_jax.metric_writer import MetricWriter, read_metrics


def test_accuracy_with_accept_lists():
    # correct: 0 in [0]; 2 in [1, 2]; 1 not in [0]; 3 in [3]
    assert metrics.accuracy([0, 2, 1, 3], [[0], [1, 2], [0], 3]) == 0.75


def test_accuracy_rejects_mismatched_or_empty_input():
    with pytest.raises(ValueError, match="predictions has 2 entries but accepts has 1"):
        metrics.accuracy([0, 1], [[0]])
    with pytest.raises(ValueError, match="empty"):
        metrics.accuracy([], [])


def test_pgr_arithmetic_and_undefined_gap():
    assert metrics.pgr(0.7, 0.6, 0.8) == pytest.approx(0.5)
    assert metrics.pgr(0.55, 0.6, 0.8) == pytest.approx(-0.25)
    assert metrics.pgr(0.9, 0.6, 0.8) == pytest.approx(1.5)
    assert metrics.pgr(0.7, 0.6, 0.6) is None
    assert metrics.pgr(0.7, 0.6, 0.5) is None


def test_agreement():
    assert metrics.agreement([0, 1, 1, 2], [0, 1, 0, 0]) == 0.5


def test_error_agreement_counts_only_supervisor_mistakes():
    supervisor = [0, 1, 1, 0, 2]
    accepts = [[0], [0], [1], [1, 2], [2]]  # supervisor wrong on examples 1 and 3
    student = [1, 1, 0, 2, 0]  # agrees with the supervisor on 1, not on 3
    supervisor_correct = metrics.correct(supervisor, accepts)
    assert metrics.error_agreement(student, supervisor, supervisor_correct) == 0.5
    assert metrics.error_agreement([0, 0], [0, 1], [True, True]) is None


def test_agreement_compares_answers_not_indices():
    """Under greedy decoding a generated move that is no candidate is index -1: two different illegal moves are
    not agreement, the same one is (pipeline.answer_keys)."""
    from w2s_jax.pipeline import answer_keys
    examples = [{"candidates": [" e4", " Nf3"]}] * 3
    weak = answer_keys(examples, [-1, -1, 1], ["Ke9", "Qxh9+", "Nf3"])
    strong = answer_keys(examples, [-1, -1, 1], ["Kf9", "Qxh9", "Nf3"])
    assert weak == ["unmatched:Ke9", "unmatched:Qxh9", "Nf3"]
    assert metrics.agreement(strong, weak) == pytest.approx(2 / 3)  # Ke9 vs Kf9 differ; Qxh9+ is Qxh9
    assert metrics.error_agreement(strong, weak, [False, False, True]) == 0.5


def test_median_pgr_ignores_none():
    assert metrics.median_pgr([0.1, None, 0.5, 0.3]) == pytest.approx(0.3)
    assert metrics.median_pgr([0.1, 0.3, None]) == pytest.approx(0.2)
    assert metrics.median_pgr([None, None]) is None


def test_predictions_round_trip(tmp_path):
    rows = [
        {"id": "a", "label": np.int64(1), "prediction": 1, "accept": [1, 2], "probs": np.array([0.25, 0.75])},
        {"id": "b", "label": 0, "prediction": np.int32(2), "correct": False},
        {"id": "c", "label": 2, "prediction": 2},
    ]
    path = tmp_path / "out" / "predictions.jsonl"
    metrics.write_predictions(path, rows)
    assert os.listdir(tmp_path / "out") == ["predictions.jsonl"]  # no temporary file left behind
    back = metrics.read_predictions(path)
    assert back == [
        {"id": "a", "label": 1, "prediction": 1, "accept": [1, 2], "probs": [0.25, 0.75]},
        {"id": "b", "label": 0, "prediction": 2, "correct": False},
        {"id": "c", "label": 2, "prediction": 2},
    ]
    assert len(path.read_text().splitlines()) == 3
    assert metrics.accuracy_from_predictions(back) == pytest.approx(2 / 3)


def test_accuracy_from_predictions_uses_accept():
    rows = [{"id": "x", "label": 0, "prediction": 1, "accept": [0, 1]}, {"id": "y", "label": 0, "prediction": 1}]
    assert metrics.accuracy_from_predictions(rows) == 0.5


def test_prediction_file_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="prediction row 1 .*'b'.* lacks prediction"):
        metrics.write_predictions(tmp_path / "p.jsonl", [{"id": "a", "label": 0, "prediction": 0},
                                                        {"id": "b", "label": 0}])
    assert not (tmp_path / "p.jsonl").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "label": 0, "prediction": 0}\n{"id": "b", "label": 0\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        metrics.read_predictions(bad)
    bad.write_text('{"id": "a", "label": 0}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: prediction row lacks prediction"):
        metrics.read_predictions(bad)


# ----------------------------------------------------------------------------------------------------------------
# MetricWriter
# ----------------------------------------------------------------------------------------------------------------


def test_metric_writer_jsonl_content_and_tensorboard(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write(0, {"loss": np.float32(0.5), "lr": 1e-3})
        writer.write(10, {"loss": 0.25, "accuracy": 1})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 0, "loss": 0.5, "lr": 0.001},
        {"step": 10, "accuracy": 1.0, "loss": 0.25},
    ]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))


def _write_steps(logdir, steps):
    writer = MetricWriter(logdir)
    for step in steps:
        writer.write(step, {"loss": 1.0 / (step + 1)})
    return writer


def test_truncate_after_makes_resumed_run_equal_uninterrupted(tmp_path):
    _write_steps(tmp_path / "full", range(5)).close()
    # interrupted after writing step 3, resumed from the checkpoint at step 2
    _write_steps(tmp_path / "resumed", range(4)).close()
    writer = MetricWriter(tmp_path / "resumed")
    writer.truncate_after(2)
    assert [row["step"] for row in read_metrics(tmp_path / "resumed")] == [0, 1, 2]
    for step in (3, 4):
        writer.write(step, {"loss": 1.0 / (step + 1)})
    writer.close()
    full = (tmp_path / "full" / "metrics.jsonl").read_text()
    assert (tmp_path / "resumed" / "metrics.jsonl").read_text() == full


def test_torn_last_line_is_dropped_on_truncate(tmp_path):
    _write_steps(tmp_path, range(2)).close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # crash mid-write
    writer = MetricWriter(tmp_path)
    writer.truncate_after(5)
    assert [row["step"] for row in read_metrics(tmp_path)] == [0, 1]
    writer.close()


def test_disabled_writer_does_nothing(tmp_path):
    with MetricWriter(tmp_path / "logs", enabled=False) as writer:
        writer.write(0, {"loss": 1.0})
        writer.truncate_after(0)
    assert not (tmp_path / "logs").exists()


def test_writer_rejects_non_scalars(tmp_path):
    with MetricWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match="metric 'loss': expected a scalar number"):
            writer.write(0, {"loss": "high"})
        with pytest.raises(ValueError, match="'step' is reserved"):
            writer.write(0, {"step": 3})
