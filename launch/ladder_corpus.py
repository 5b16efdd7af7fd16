"""Build the ladder's pretraining corpus: the shipped puzzle set's corpus plus the games of further generator runs.

    python -m w2s_jax.data.chess_gen --out /tmp/corpus_s2 --preset tiny --seed 2 --n-train 0 --n-test 0 \\
        --corpus-games 6000
    python launch/ladder_corpus.py --out data/chess/ladder/corpus.txt.gz /tmp/corpus_s2/corpus.txt.gz

A game is dropped when it repeats an earlier one or starts with the game prefix of any train or test puzzle in
`--puzzles` (chess_gen.check_disjoint), so no pretraining game is a puzzle's game. Prints what it kept and dropped.
"""
import argparse
import itertools
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from w2s_jax.data import chess as chess_data  # noqa: E402
from w2s_jax.data import chess_gen  # noqa: E402


def build(puzzle_dir, extra_corpora):
    """(games, counts): the puzzle set's corpus then each extra corpus, without repeats or puzzle games."""
    base = chess_data.read_corpus(chess_data.find_data_file(puzzle_dir, "corpus.txt"))
    puzzles = [p for name in ("train.csv", "test.csv")
               for p in chess_data.read_lichess_csv(chess_data.find_data_file(puzzle_dir, name), "raise")]
    corpora = [base] + [chess_data.read_corpus(path) for path in extra_corpora]
    games, seen = [], set()
    counts = {"base": len(base), "extra": sum(map(len, corpora[1:])), "repeats": 0, "puzzle_games": 0}
    for game in itertools.chain.from_iterable(corpora):
        if game in seen:
            counts["repeats"] += 1
            continue
        seen.add(game)
        games.append(game)
    overlapping = {index for index, _ in chess_gen.check_disjoint(games, puzzles)}
    counts["puzzle_games"] = len(overlapping)
    games = [g for i, g in enumerate(games) if i not in overlapping]
    counts["kept"] = len(games)
    return games, counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="corpus file to write (.txt or .txt.gz)")
    ap.add_argument("--puzzles", default=os.path.join(REPO, "data", "chess", "tiny"),
                    help="puzzle set whose corpus comes first and whose games are kept out")
    ap.add_argument("extra", nargs="+", help="further corpus files (one numbered game per line)")
    args = ap.parse_args(argv)
    missing = [path for path in args.extra if not os.path.isfile(path)]
    if missing or not os.path.isdir(args.puzzles):
        ap.error(f"no such file: {', '.join(missing)}" if missing else f"--puzzles={args.puzzles}: no such folder")
    games, counts = build(args.puzzles, args.extra)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with chess_data.open_text(args.out, "wt") as f:
        f.write("".join(g + "\n" for g in games))
    print(f"wrote {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
