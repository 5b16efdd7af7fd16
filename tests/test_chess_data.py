"""Chess puzzle data: prompts, the lichess CSV reader, examples, the generator (with Stockfish) and shipped data."""
import csv
import json
import logging

import chess
import pytest

from w2s_jax.data import chess as cd
from w2s_jax.data import chess_gen

try:
    STOCKFISH = chess_gen.find_stockfish()
except chess_gen.StockfishNotFound:
    STOCKFISH = None
needs_stockfish = pytest.mark.skipif(STOCKFISH is None, reason="Stockfish is not installed "
                                     "(apt-get install stockfish; Debian puts it in /usr/games)")

HEADER = ",".join(cd.LICHESS_COLUMNS) + ",Transcript"
# 1. e4 e5 2. Bc4 Nc6 3. Qh5 Nf6?? 4. Qxf7#: the FEN is before the opponent's move Nf6 (g8f6)
SCHOLAR_FEN = "r1bqkbnr/pppp1ppp/2n5/4p2Q/2B1P3/8/PPPP1PPP/RNB1K1NR b KQkq - 3 3"
SCHOLAR_ROW = f"sch01,{SCHOLAR_FEN},g8f6 h5f7,600,80,90,100,mate mateIn1 oneMove,https://x/g1#6,,e4 e5 Bc4 Nc6 Qh5 Nf6"


# ----------------------------------------------------------------------------------------------- prompts


def test_transcript_prompt_numbers_every_half_move():
    assert cd.transcript_prompt(["e4", "e5", "Nf3", "Nc6", "Bb5"]) == "1. e4 1... e5 2. Nf3 2... Nc6 3. Bb5 3..."
    assert cd.transcript_prompt(["e4", "e5"]) == "1. e4 1... e5 2."
    assert cd.transcript_prompt([]) == "1."
    assert cd.numbered_transcript(["d4", "d5", "c4"]) == "1. d4 1... d5 2. c4"
    assert cd.parse_transcript("1. d4 1... d5 2. c4") == ["d4", "d5", "c4"]


def test_fen_prompt_ends_with_the_move_number():
    assert cd.fen_prompt(SCHOLAR_FEN) == f"FEN {SCHOLAR_FEN}\n3..."
    assert cd.fen_prompt(chess.STARTING_FEN) == f"FEN {chess.STARTING_FEN}\n1."


# ----------------------------------------------------------------------------------------------- reader


def write(tmp_path, rows, name="puzzles.csv", header=HEADER):
    path = tmp_path / name
    path.write_text("\n".join([header] + rows) + "\n")
    return path


def test_reader_parses_a_row_with_transcript(tmp_path):
    [p] = cd.read_lichess_csv(write(tmp_path, [SCHOLAR_ROW]), on_error="raise")
    assert p["id"] == "sch01"
    assert p["fen"] == "r1bqkb1r/pppp1ppp/2n2n2/4p2Q/2B1P3/8/PPPP1PPP/RNB1K1NR w KQkq - 4 4"
    assert (p["solution"], p["solution_uci"], p["moves"]) == ("Qxf7#", "h5f7", ["g8f6", "h5f7"])
    assert (p["rating"], p["themes"], p["game_url"]) == (600, ["mate", "mateIn1", "oneMove"], "https://x/g1#6")
    assert p["transcript"] == ["e4", "e5", "Bc4", "Nc6", "Qh5", "Nf6"]
    [example] = cd.puzzles_to_examples([p], "transcript")
    assert example["prompt"] == "1. e4 1... e5 2. Bc4 2... Nc6 3. Qh5 3... Nf6 4."
    assert example["candidates"][example["label"]] == " Qxf7#"
    assert example["accept"] == [example["label"]]


MALFORMED = [  # (row, words in the error)
    ("bad01,not-a-fen,g8f6 h5f7,600,80,90,100,mate,u,,", "bad FEN"),
    (f"bad02,{SCHOLAR_FEN},g8f6 zz99,600,80,90,100,mate,u,,", "unparsable move 'zz99'"),
    (f"bad03,{SCHOLAR_FEN},g8f6 h5h8,600,80,90,100,mate,u,,", "illegal move 'h5h8'"),
    (f"bad04,{SCHOLAR_FEN},g8f6 h5f7,600,80,90", "expected 11 columns, found 6"),
    (f"bad05,{SCHOLAR_FEN},g8f6 h5f7,600,80,90,100,mate,u,,e4 e5 Bc4 Nc6 Qf3 Nf6", "transcript does not reach"),
    (f"bad06,{SCHOLAR_FEN},g8f6 h5f7,high,80,90,100,mate,u,,", "bad Rating 'high'"),
    (f"bad07,{SCHOLAR_FEN},g8f6,600,80,90,100,mate,u,,", "needs the opponent's move"),
    (f"bad08,{SCHOLAR_FEN},g8f6 h5f7,600,80,90,100,mate,u,,e4 e5 Ke3", "transcript move 3 'Ke3' is illegal"),
]


def test_reader_skips_each_kind_of_malformed_row_with_its_line(tmp_path, caplog):
    rows = [SCHOLAR_ROW] + [row for row, _ in MALFORMED] + [SCHOLAR_ROW.replace("sch01", "sch02")]
    path = write(tmp_path, rows)
    with caplog.at_level(logging.WARNING):
        puzzles = cd.read_lichess_csv(path)
    assert [p["id"] for p in puzzles] == ["sch01", "sch02"]
    assert len(caplog.records) == len(MALFORMED)
    for line, (record, (_, words)) in enumerate(zip(caplog.records, MALFORMED), start=3):
        assert f"{path}:{line}:" in record.getMessage() and words in record.getMessage()


@pytest.mark.parametrize("index", range(len(MALFORMED)))
def test_reader_raises_with_file_and_line(tmp_path, index):
    row, words = MALFORMED[index]
    path = write(tmp_path, [SCHOLAR_ROW, row])
    with pytest.raises(ValueError) as error:
        cd.read_lichess_csv(path, on_error="raise")
    assert str(error.value).startswith(f"{path}:3: ") and words in str(error.value)


def test_reader_needs_the_columns_and_reads_gzip(tmp_path):
    with pytest.raises(ValueError, match="lacks column.*Moves"):
        cd.read_lichess_csv(write(tmp_path, [], header="PuzzleId,FEN,Rating,Themes,GameUrl"))
    rows = [dict(zip(HEADER.split(","), next(csv.reader([SCHOLAR_ROW]))))]
    cd.write_lichess_csv(tmp_path / "p.csv.gz", rows)
    [p] = cd.read_lichess_csv(tmp_path / "p.csv.gz", on_error="raise")
    assert p["solution"] == "Qxf7#" and p["transcript"][-1] == "Nf6"


# ----------------------------------------------------------------------------------------------- examples


def test_mate_in_one_accepts_every_mate():
    # White: Kg1, Ra1, Rb2; Black: Kh8, pawns g7 h7 -> both Ra8# and Rb8# mate
    puzzle = {"id": "m1", "fen": "7k/6pp/8/8/8/8/1R6/R5K1 w - - 0 1", "solution_uci": "a1a8", "rating": 800,
              "themes": ["mateIn1"], "transcript": None}
    [example] = cd.puzzles_to_examples([puzzle], "auto")
    candidates = example["candidates"]
    assert candidates == sorted(candidates) and len(candidates) == 5 + 12 + 14  # king, rook a1, rook b2
    assert candidates[example["label"]] == " Ra8#"
    assert [candidates[i] for i in example["accept"]] == [" Ra8#", " Rb8#"]
    assert example["prompt"] == "FEN 7k/6pp/8/8/8/8/1R6/R5K1 w - - 0 1\n1."
    assert example["meta"] == {"rating": 800, "themes": ["mateIn1"], "fen": puzzle["fen"], "solution_uci": "a1a8"}
    with pytest.raises(ValueError, match="m1: prompt_format='transcript' but it has no transcript"):
        cd.puzzles_to_examples([puzzle], "transcript")


# ----------------------------------------------------------------------------------------------- task loading


def lichess_task(tmp_path, n_train, n_test, **overrides):
    rows = [SCHOLAR_ROW.replace("sch01", f"p{i:02d}").replace("g1#6", f"g{i // 2}#6") for i in range(10)]
    cfg = cd.default_task_config()
    cfg.source = "lichess_csv"
    cfg.csv_path = str(write(tmp_path, rows))
    cfg.n_train, cfg.n_test = n_train, n_test
    cfg.update(overrides)
    return cfg


def test_lichess_csv_task_splits_by_game_and_is_deterministic(tmp_path):
    task = cd.load_chess_task(lichess_task(tmp_path, 6, 4))
    again = cd.load_chess_task(lichess_task(tmp_path, 6, 4))
    assert [e["id"] for e in task["train"]] == [e["id"] for e in again["train"]]
    assert (len(task["train"]), len(task["test"]), task["corpus"]) == (6, 4, [])
    games = lambda split: {int(e["id"][1:]) // 2 for e in split}  # noqa: E731
    assert not games(task["train"]) & games(task["test"])
    other_seed = cd.load_chess_task(lichess_task(tmp_path, 6, 4, seed=1))
    assert [e["id"] for e in other_seed["test"]] != [e["id"] for e in task["test"]]


def test_examples_carry_their_game_and_a_separate_test_csv_shares_none(tmp_path):
    """A test CSV given apart from the training CSV: training puzzles from a game of a test puzzle are skipped
    (with a note), so no game feeds both; every example's group is its game, side and move anchor dropped."""
    assert cd.game_id("https://lichess.org/abcd1234/black#48", "x") == "https://lichess.org/abcd1234"
    assert cd.game_id("", "p7") == "puzzle:p7"
    test_rows = [SCHOLAR_ROW.replace("sch01", f"t{i}").replace("g1#6", f"g{i}#6") for i in range(2)]
    cfg = lichess_task(tmp_path, 4, 2, test_csv_path=str(write(tmp_path, test_rows, name="test.csv")))
    task = cd.load_chess_task(cfg)
    train_games = {e["group"] for e in task["train"]}
    test_games = {e["group"] for e in task["test"]}
    assert test_games == {"https://x/g0", "https://x/g1"}
    assert not train_games & test_games and len(task["train"]) == 4
    assert task["notes"] == ["4 of 10 puzzles in puzzles.csv come from a game of a test puzzle and were not used "
                             "for training"]


def test_task_errors_name_the_config_key(tmp_path):
    cfg = lichess_task(tmp_path, 6, 4, csv_path=str(tmp_path / "missing.csv"))
    with pytest.raises(FileNotFoundError, match=r"task\.csv_path: .*missing\.csv does not exist"):
        cd.load_chess_task(cfg)
    cfg = cd.default_task_config()
    cfg.data_dir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"task\.data_dir: .*nowhere does not exist"):
        cd.load_chess_task(cfg)
    with pytest.raises(ValueError, match=r"task\.n_train=20, task\.n_test=4: .*csv has only 10 valid puzzles"):
        cd.load_chess_task(lichess_task(tmp_path, 20, 4))


# ----------------------------------------------------------------------------------------------- exact mates


def brute_mates(board):
    mates = []
    for move in board.legal_moves:
        board.push(move)
        if board.is_checkmate():
            mates.append(move.uci())
        board.pop()
    return mates


def brute_forces_mate_in_two(board, move):
    board.push(move)
    try:
        if board.is_checkmate():
            return True
        replies = list(board.legal_moves)
        return bool(replies) and all(_after(board, r, lambda b: bool(brute_mates(b))) for r in replies)
    finally:
        board.pop()


def _after(board, move, predicate):
    board.push(move)
    try:
        return predicate(board)
    finally:
        board.pop()


def test_exact_mate_in_two_has_a_unique_key():
    # White Ra6 Qg4 Kf1 vs Kh8 Rf7 Be3: 1. Ra8+ Rf8 2. Rxf8# (1. Qc8+? Kg7)
    board = chess.Board("7k/5r1p/R7/2p5/1P4Q1/P3bP2/7P/5K2 w - - 0 47")
    line = chess_gen.exact_mate_line(board, max_n=2)
    assert [m.uci() for m in line] == ["a6a8", "f7f8", "a8f8"]
    assert brute_mates(board) == []
    keys = [m.uci() for m in board.legal_moves if brute_forces_mate_in_two(board, m)]
    assert keys == ["a6a8"]


# ----------------------------------------------------------------------------------------------- generator


def test_stockfish_missing_says_how_to_install(tmp_path):
    with pytest.raises(chess_gen.StockfishNotFound, match=r"apt-get install stockfish.*/usr/games.*--stockfish"):
        chess_gen.find_stockfish(str(tmp_path / "no-stockfish"))


def test_mate_mode_finds_the_scholars_mate_without_an_engine():
    cfg = chess_gen.preset_config("test", min_puzzle_ply=4)
    moves = ["e2e4", "e7e5", "f1c4", "b8c6", "d1h5", "g8f6", "h5f7"]
    played = {"moves": moves, "analyses": {}, "evals": {}, "blunders": []}
    [puzzle] = chess_gen.find_puzzles(played, None, cfg, ("mate",))
    assert (puzzle["ply"], puzzle["mode"], puzzle["line"]) == (6, "mate", ["h5f7"])
    assert puzzle["themes"] == ["mode_mate", "mate", "mateIn1", "oneMove", "opening"]
    row = chess_gen.puzzle_row({"index": 0, "stream": "puzzle", "moves": moves, "sans": chess_gen.san_moves(moves)},
                               puzzle, seed=0)
    assert (row["FEN"], row["Moves"], row["Transcript"]) == (SCHOLAR_FEN, "g8f6 h5f7", "e4 e5 Bc4 Nc6 Qh5 Nf6")


def test_engine_free_mate_mode(tmp_path):
    cfg = chess_gen.preset_config("test", stockfish=str(tmp_path / "none"), modes=("mate",), n_train=1, n_test=1,
                                  corpus_games=2, mode_caps={"mate": 1.0}, max_puzzles_per_game=1, mate_max_n=1)
    result = chess_gen.generate(cfg, log=lambda *_: None)
    assert (len(result["train"]), len(result["test"]), result["stats"]["stockfish"]) == (1, 1, None)
    for row in result["train"] + result["test"]:
        assert_exact_mate(*solver_view(row))


def assert_exact_mate(fen, solution_uci, themes):
    """A brute-force proof: a unique mate in one, or no mate in one and a unique key that forces mate in two."""
    board = chess.Board(fen)
    if "mateIn1" in themes:
        assert brute_mates(board) == [solution_uci]
    else:
        assert "mateIn2" in themes and brute_mates(board) == []
        keys = [m.uci() for m in board.legal_moves if brute_forces_mate_in_two(board, m)]
        assert keys == [solution_uci]


def solver_view(row):
    """(fen the solver faces, first solution move, themes) of a generator CSV row."""
    board = chess.Board(row["FEN"])
    opponent, solution = row["Moves"].split()[:2]
    board.push(chess.Move.from_uci(opponent))
    return board.fen(), solution, row["Themes"].split()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """The CLI at its `test` preset: 6 train + 3 test puzzles and 3 corpus games, written to a folder."""
    if STOCKFISH is None:
        pytest.skip("Stockfish is not installed (apt-get install stockfish; Debian puts it in /usr/games)")
    out = tmp_path_factory.mktemp("gen")
    chess_gen.main(["--out", str(out), "--preset", "test", "--seed", "3"])
    return out


@needs_stockfish
def test_cli_writes_consistent_files(generated):
    stats = json.loads((generated / "stats.json").read_text())
    train = cd.read_lichess_csv(generated / "train.csv", on_error="raise")  # legal moves, transcripts reach FEN
    test = cd.read_lichess_csv(generated / "test.csv", on_error="raise")
    corpus = cd.read_corpus(generated / "corpus.txt")
    assert (len(train), len(test)) == (6, 3) == (stats["train"]["puzzles"], stats["test"]["puzzles"])
    assert stats["corpus"]["games"] == len(corpus) >= 3
    assert stats["command"].startswith("python -m w2s_jax.data.chess_gen --out")
    assert sum(stats["train"]["modes"].values()) == 6
    game = lambda p: p["game_url"].split("#")[0]  # noqa: E731
    assert not {game(p) for p in train} & {game(p) for p in test}
    assert len({p["fen"] for p in train + test}) == 9
    for p in train + test:
        assert p["transcript"] and p["game_url"].endswith(f"#{len(p['transcript'])}")
        example = cd.puzzle_to_example(p, "transcript")
        assert example["candidates"][example["label"]] == " " + p["solution"]
    for text in corpus:  # every corpus game is a legal numbered game from the start
        board = chess.Board()
        for san in cd.parse_transcript(text):
            board.push_san(san)
        assert cd.numbered_transcript(cd.parse_transcript(text)) == text


@needs_stockfish
def test_generated_task_subsamples_deterministically(generated):
    cfg = cd.default_task_config()
    cfg.update(data_dir=str(generated), n_train=4, n_test=2, prompt_format="auto")
    task = cd.load_chess_task(cfg)
    assert (len(task["train"]), len(task["test"]), len(task["corpus"])) == (4, 2, len(cd.read_corpus(
        generated / "corpus.txt")))
    assert [e["id"] for e in task["train"]] == [e["id"] for e in cd.load_chess_task(cfg)["train"]]
    assert all(e["prompt"].startswith("1. ") for e in task["train"])  # auto: these rows have transcripts
    cfg.n_train = 7
    with pytest.raises(ValueError, match=r"task\.n_train = 7 but .*train\.csv has only 6 valid puzzles"):
        cd.load_chess_task(cfg)


@needs_stockfish
def test_generated_solutions_are_deep_best_moves_or_exact_mates(generated):
    puzzles = cd.read_lichess_csv(generated / "train.csv") + cd.read_lichess_csv(generated / "test.csv")
    engine = chess_gen.UciEngine(STOCKFISH)
    try:
        checked = 0
        for p in puzzles:
            if "mode_mate" in p["themes"]:
                assert_exact_mate(p["fen"], p["solution_uci"], p["themes"])
            elif checked < 3:  # ten times the generator's verification budget
                engine.new_game()
                deep = engine.analyse([], fen=p["fen"], nodes=200_000, multipv=2)
                assert deep.best == p["solution_uci"], (p["id"], deep.lines)
                checked += 1
        assert checked >= 1
    finally:
        engine.close()


@needs_stockfish
def test_corpus_and_puzzles_are_disjoint_and_a_planted_overlap_is_caught(generated):
    puzzles = cd.read_lichess_csv(generated / "train.csv") + cd.read_lichess_csv(generated / "test.csv")
    corpus = cd.read_corpus(generated / "corpus.txt")
    assert chess_gen.check_disjoint(corpus, puzzles) == []
    victim = puzzles[0]
    board = chess.Board()
    for san in victim["transcript"]:
        board.push_san(san)
    longer = victim["transcript"] + [board.san(next(iter(board.legal_moves)))]
    shorter = victim["transcript"][:-1]
    planted = corpus + [cd.numbered_transcript(longer), cd.numbered_transcript(shorter)]
    assert chess_gen.check_disjoint(planted, puzzles) == [(len(corpus), victim["id"])]


@needs_stockfish
def test_play_is_deterministic_from_the_seed():
    cfg = chess_gen.preset_config("test", max_plies=30)
    chess_gen._init_worker(cfg.to_dict(), STOCKFISH)
    try:
        games = [chess_gen.run_game(("corpus", index, ()))["moves"] for index in (7, 8, 7)]
    finally:
        chess_gen._close_worker()
    assert games[0] == games[2] != games[1]
    assert len(games[0]) == 30


# ----------------------------------------------------------------------------------------------- shipped data


def test_shipped_tiny_data_loads_with_the_promised_sizes():
    cfg = cd.default_task_config()
    task = cd.load_chess_task(cfg)
    assert (len(task["train"]), len(task["test"])) == (4000, 500)
    assert len(task["corpus"]) >= 2000 and sum(map(len, task["corpus"])) > 2_000_000
    stats = json.loads((cd.REPO_ROOT / "data/chess/tiny/stats.json").read_text())
    assert stats["train"]["puzzles"] >= 4000 and stats["test"]["puzzles"] >= 500
    assert stats["corpus"]["games"] == len(task["corpus"])
    for example in task["train"][:50] + task["test"][:50]:
        assert example["prompt"].endswith(".") and example["candidates"][example["label"]].startswith(" ")
        assert set(example["accept"]) >= {example["label"]}
    ids = {e["id"] for e in task["train"]} | {e["id"] for e in task["test"]}
    assert len(ids) == 4500
