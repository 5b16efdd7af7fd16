"""The ladder's tools: launch/ladder_corpus.py keeps the puzzle set's games first and drops repeats and every game
that starts with a puzzle's game; launch/ladder_curve.py puts each rung's accuracy against its pretraining compute."""
import importlib.util
import json
import random
import shutil
from pathlib import Path

import chess
import pytest

from w2s_jax.data import chess as cd

REPO = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ladder_corpus, ladder_curve = load_script("ladder_corpus"), load_script("ladder_curve")


def random_game(seed, start=()):
    rng, board = random.Random(seed), chess.Board()
    sans = list(start)
    for san in sans:
        board.push_san(san)
    while len(sans) < 40 and not board.is_game_over():
        move = rng.choice(list(board.legal_moves))
        sans.append(board.san(move))
        board.push(move)
    return cd.numbered_transcript(sans)


def test_repeats_and_puzzle_games_are_dropped(tmp_path):
    puzzles = tmp_path / "puzzles"
    puzzles.mkdir()
    for name in ("train.csv.gz", "test.csv"):
        shutil.copy(REPO / "data" / "chess" / "tiny" / name, puzzles / name)
    base = [random_game(i) for i in range(3)]
    (puzzles / "corpus.txt").write_text("".join(g + "\n" for g in base))
    test_puzzle = cd.read_lichess_csv(puzzles / "test.csv")[0]
    extra = [random_game(10), base[1], random_game(11, test_puzzle["transcript"]), random_game(12)]
    (tmp_path / "extra.txt").write_text("".join(g + "\n" for g in extra))

    games, counts = ladder_corpus.build(puzzles, [tmp_path / "extra.txt"])
    assert games == base + [extra[0], extra[3]]
    assert counts == {"base": 3, "extra": 4, "repeats": 1, "puzzle_games": 1, "kept": 5}

    out = tmp_path / "ladder" / "corpus.txt.gz"
    assert ladder_corpus.main(["--out", str(out), "--puzzles", str(puzzles), str(tmp_path / "extra.txt")]) == 0
    assert cd.read_corpus(out) == games


def test_curve_orders_rungs_by_compute_and_writes_the_plot(tmp_path, capsys):
    manifest = {"models": {
        "strong": {"params": 900, "non_embedding_params": 500, "steps": 30, "tokens_seen": 3000},
        "weak": {"params": 300, "non_embedding_params": 100, "steps": 10, "tokens_seen": 1000},
        "unused": {"params": 1, "non_embedding_params": 1, "steps": 1, "tokens_seen": 1}}}
    results = {"task": "chess", "seeds": [0, 1], "models": {"weak": {"params": 300}, "strong": {"params": 900}},
               "runs": [
        {"name": "gt_weak", "role": "weak", "model": "weak", "accuracy": 0.3, "accuracy_ci": [0.25, 0.35],
         "accuracy_seeds": [0.29, 0.31]},
        {"name": "gt_strong", "role": "ceiling", "model": "strong", "accuracy": 0.45, "accuracy_ci": [0.4, 0.5],
         "accuracy_seeds": [0.44, 0.46]}]}
    for name, data in (("results.json", results), ("manifest.json", manifest)):
        (tmp_path / name).write_text(json.dumps(data))
    out = tmp_path / "curve.png"
    assert ladder_curve.main(["--results", str(tmp_path / "results.json"), "--manifest",
                              str(tmp_path / "manifest.json"), "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2] == "| weak | 300 (100) | 10 | 1,000 | 6.00e+05 | 0.300 [0.250, 0.350] | 0.29 / 0.31 |"
    assert table[3] == "| strong | 900 (500) | 30 | 3,000 | 9.00e+06 | 0.450 [0.400, 0.500] | 0.44 / 0.46 |"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow(65)
def test_pretrain_ladder_writes_loadable_checkpoints_and_a_manifest(tmp_path):
    """launch/pretrain_ladder.py at toy size: the pipeline's own pretraining, copied out as HF checkpoints that a
    `source='hf'` model loads, with the manifest that the shipped ladder's test reads."""
    import subprocess
    import sys

    from w2s_jax.models import convert
    out = tmp_path / "ladder"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "pretrain_ladder.py"), "--preset", "smoke",
                           "--steps", "weak=2,mid=2,strong=3", "--out", str(out), "--workdir", str(tmp_path / "wd")],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preset"] == "smoke" and manifest["tokenizer_split"] == "word"
    assert {m: manifest["models"][m]["steps"] for m in ("weak", "mid", "strong")} == {"weak": 2, "mid": 2,
                                                                                      "strong": 3}
    for name in ("weak", "mid", "strong"):
        lcfg = convert.checkpoint_config(str(out / name))
        assert lcfg.num_non_embedding_params == manifest["models"][name]["non_embedding_params"]
        assert (out / name / "tokenizer.json").is_file() and not (out / name / "fingerprint.json").exists()
