"""Chess puzzles as weak-to-strong examples.

Reads the lichess puzzle CSV (optionally with a `Transcript` column holding the source game's SAN moves), writes
the paper's prompts (every half-move numbered, ending with the number of the move to find), turns puzzles into
`Example`s (docs/CONTRACTS.md) whose candidates are the legal moves, and loads the chess task from a config.

Prompt formats (the target always follows with a leading space, e.g. `" Rxe7"`):
  transcript: `1. e4 1... e5 2. Nf3 ... 27. Ne7+ 27...`   (the game up to and including the opponent's move)
  fen:        `FEN r3r1k1/4N2p/6p1/3q1p2/pR2b3/P1P5/5PPP/3Q1R1K b - - 1 27\n27...`
"""
import csv
import gzip
import io
import logging
import random
from pathlib import Path

import chess
import ml_collections

from w2s_jax.errors import MissingFile, UserError

logger = logging.getLogger(__name__)

LICHESS_COLUMNS = ("PuzzleId", "FEN", "Moves", "Rating", "RatingDeviation", "Popularity", "NbPlays", "Themes",
                   "GameUrl", "OpeningTags")
TRANSCRIPT_COLUMN = "Transcript"
REQUIRED_COLUMNS = ("PuzzleId", "FEN", "Moves", "Rating", "Themes", "GameUrl")
PROMPT_FORMATS = ("transcript", "fen", "auto")
REPO_ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------- files


def open_text(path, mode="rt"):
    """Opens a text file, transparently gzip-compressed when the name ends in `.gz`."""
    if str(path).endswith(".gz"):
        if "w" in mode:  # mtime=0: the same rows give the same bytes
            return io.TextIOWrapper(gzip.GzipFile(path, "wb", mtime=0), encoding="utf-8", newline="")
        return gzip.open(path, mode, encoding="utf-8", newline="")
    return open(path, mode[0], encoding="utf-8", newline="")


def find_data_file(directory, stem):
    """`directory/stem` or `directory/stem.gz`, whichever exists (None if neither)."""
    for name in (stem, stem + ".gz"):
        path = Path(directory) / name
        if path.exists():
            return path
    return None


# ----------------------------------------------------------------------------------------------- text formats


def move_number(ply):
    """The move-number token before half-move `ply` (0-based from the start): `"28."` (white), `"27..."` (black)."""
    number = ply // 2 + 1
    return f"{number}." if ply % 2 == 0 else f"{number}..."


def numbered_transcript(sans):
    """SAN moves from the standard start with every half-move numbered: `1. e4 1... e5 2. Nf3`."""
    return " ".join(f"{move_number(ply)} {san}" for ply, san in enumerate(sans))


def transcript_prompt(sans):
    """The paper's prompt: the numbered game so far, then the number of the move to find."""
    marker = move_number(len(sans))
    return f"{numbered_transcript(sans)} {marker}" if sans else marker


def fen_prompt(fen):
    """Prompt for a puzzle without history: the position, then the number of the move to find."""
    board = chess.Board(fen)
    marker = f"{board.fullmove_number}." if board.turn == chess.WHITE else f"{board.fullmove_number}..."
    return f"FEN {fen}\n{marker}"


def parse_transcript(text):
    """Inverse of `numbered_transcript`: the SAN moves of a numbered game text (move numbers dropped)."""
    return [token for token in text.split() if not token[0].isdigit()]


def read_corpus(path):
    """Pretraining games, one numbered transcript per line (blank lines skipped)."""
    with open_text(path) as f:
        return [line.strip() for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------- lichess CSV


class _RowError(ValueError):
    """A malformed CSV row; the reader adds file and line."""


def _position_key(board):
    """Placement, side to move, castling and a *legal* en-passant square: how two FENs name the same position."""
    return " ".join(board.fen(en_passant="legal").split()[:4])


def _parse_board(fen):
    try:
        board = chess.Board(fen)
    except ValueError as e:
        raise _RowError(f"bad FEN {fen!r}: {e}") from None
    if not board.is_valid():
        raise _RowError(f"bad FEN {fen!r}: not a legal position ({board.status()!r})")
    return board


def _parse_moves(board, moves_field):
    """Applies the UCI moves on a copy of `board`; returns the move list and the SAN of each."""
    ucis = moves_field.split()
    if len(ucis) < 2:
        raise _RowError(f"Moves {moves_field!r} needs the opponent's move and at least one solution move")
    board = board.copy(stack=False)
    sans = []
    for index, uci in enumerate(ucis):
        try:
            move = chess.Move.from_uci(uci)
        except ValueError:
            raise _RowError(f"unparsable move {uci!r} (Moves index {index})") from None
        if not board.is_legal(move):
            raise _RowError(f"illegal move {uci!r} (Moves index {index}) in {board.fen()}")
        sans.append(board.san(move))
        board.push(move)
    return ucis, sans


def _parse_transcript_field(text, fen_board, opponent_san):
    """The game's SAN moves; they must lead from the standard start to the puzzle FEN, then play Moves[0]."""
    sans = text.split()
    board = chess.Board()
    for index, san in enumerate(sans):
        try:
            board.push_san(san)
        except ValueError:
            raise _RowError(f"transcript move {index + 1} {san!r} is illegal in {board.fen()}") from None
    board.pop()
    if _position_key(board) != _position_key(fen_board) or sans[-1] != opponent_san:
        raise _RowError(f"transcript does not reach the FEN and then play {opponent_san!r} "
                        f"(it reaches {board.fen()} and plays {sans[-1]!r})")
    return sans


def _parse_row(fields):
    puzzle_id = fields["PuzzleId"].strip()
    if not puzzle_id:
        raise _RowError("empty PuzzleId")
    fen_board = _parse_board(fields["FEN"].strip())
    ucis, sans = _parse_moves(fen_board, fields["Moves"])
    try:
        rating = int(fields["Rating"])
    except ValueError:
        raise _RowError(f"bad Rating {fields['Rating']!r}") from None
    transcript = None
    if fields.get(TRANSCRIPT_COLUMN, "").strip():
        transcript = _parse_transcript_field(fields[TRANSCRIPT_COLUMN], fen_board, sans[0])
    board = fen_board.copy(stack=False)
    board.push(chess.Move.from_uci(ucis[0]))
    return {
        "id": puzzle_id,
        "fen": board.fen(),
        "fen_before": fields["FEN"].strip(),
        "solution": sans[1],
        "solution_uci": ucis[1],
        "moves": ucis,
        "rating": rating,
        "themes": fields["Themes"].split(),
        "game_url": fields["GameUrl"].strip(),
        "transcript": transcript,
    }


def _csv_rows(path):
    """(line number, {column: value} or None if the column count is wrong, raw row) for every data row."""
    with open_text(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise UserError(f"{path}: empty file, expected a header with {', '.join(LICHESS_COLUMNS)}")
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise UserError(f"{path}:1: header lacks column(s) {', '.join(missing)}")
        rows = []
        for row in reader:
            if row:
                rows.append((reader.line_num, dict(zip(header, row)) if len(row) == len(header) else None,
                             len(header), len(row)))
        return rows


def _parse_or_report(path, row, on_error):
    """The record of one `_csv_rows` row, or None (logged) for a malformed row when on_error="skip"."""
    line, fields, expected, found = row
    try:
        if fields is None:
            raise _RowError(f"expected {expected} columns, found {found}")
        return _parse_row(fields)
    except _RowError as e:
        message = f"{path}:{line}: {e}"
        if on_error == "raise":
            raise UserError(message) from None
        logger.warning("skipping malformed puzzle row: %s", message)
        return None


def _check_on_error(on_error):
    if on_error not in ("skip", "raise"):
        raise UserError(f"on_error must be 'skip' or 'raise', got {on_error!r}")


def read_lichess_csv(path, on_error="skip"):
    """Reads lichess puzzle rows (`.csv` or `.csv.gz`) into puzzle records.

    A record has `id`, `fen` (the position the solver faces, after Moves[0]), `fen_before` (the CSV's FEN),
    `solution` (Moves[1] in SAN), `solution_uci`, `moves` (UCI), `rating`, `themes`, `game_url` and `transcript`
    (SAN list up to and including Moves[0], or None). Malformed rows are logged with file:line and skipped
    (`on_error="skip"`) or raise `ValueError` naming file:line (`on_error="raise"`).
    """
    _check_on_error(on_error)
    records = (_parse_or_report(path, row, on_error) for row in _csv_rows(path))
    return [r for r in records if r is not None]


def write_lichess_csv(path, rows, with_transcript=True):
    """Writes rows (dicts keyed by the lichess column names, plus `Transcript`) as CSV (gzip if `.gz`)."""
    columns = list(LICHESS_COLUMNS) + ([TRANSCRIPT_COLUMN] if with_transcript else [])
    with open_text(path, "wt") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------------------------- examples


def puzzle_prompt(puzzle, prompt_format):
    """The prompt text for one puzzle record; `auto` uses the transcript when the record has one."""
    if prompt_format not in PROMPT_FORMATS:
        raise UserError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if prompt_format == "fen" or (prompt_format == "auto" and not puzzle.get("transcript")):
        return fen_prompt(puzzle["fen"])
    if not puzzle.get("transcript"):
        raise UserError(f"puzzle {puzzle['id']}: prompt_format='transcript' but it has no transcript "
                         "(use prompt_format='auto' to fall back to the FEN prompt)")
    return transcript_prompt(puzzle["transcript"])


def legal_move_candidates(board):
    """Every legal move as SAN with a leading space, sorted (a deterministic order)."""
    return sorted(" " + board.san(move) for move in board.legal_moves)


def game_id(game_url, puzzle_id):
    """The game a puzzle comes from: its GameUrl without the move anchor and the side (lichess writes
    `https://lichess.org/<id>/black#48`); a puzzle without one is its own game."""
    url = game_url.split("#")[0].strip().rstrip("/")
    for side in ("/white", "/black"):
        if url.endswith(side):
            url = url[:-len(side)]
    return url or f"puzzle:{puzzle_id}"


def puzzle_to_example(puzzle, prompt_format):
    board = chess.Board(puzzle["fen"])
    candidates = legal_move_candidates(board)
    solution = " " + board.san(chess.Move.from_uci(puzzle["solution_uci"]))
    label = candidates.index(solution)
    if solution.endswith("#"):  # mate in one: any mate solves it, as on lichess
        accept = [i for i, c in enumerate(candidates) if c.endswith("#")]
    else:
        accept = [label]
    return {
        "id": puzzle["id"],
        "prompt": puzzle_prompt(puzzle, prompt_format),
        "candidates": candidates,
        "label": label,
        "accept": accept,
        "group": game_id(puzzle.get("game_url", ""), puzzle["id"]),  # splits keep a game's puzzles together
        "meta": {"rating": puzzle["rating"], "themes": list(puzzle["themes"]), "fen": puzzle["fen"],
                 "solution_uci": puzzle["solution_uci"]},
    }


def puzzles_to_examples(puzzles, prompt_format="transcript"):
    """Puzzle records -> Examples: candidates = legal moves, label = the first solution move."""
    return [puzzle_to_example(p, prompt_format) for p in puzzles]


# ----------------------------------------------------------------------------------------------- task loading


def default_task_config():
    """The chess task's config (`task` in configs/chess.py).

    source:         "generated" (the shipped/generated data in `data_dir`) or "lichess_csv" (`csv_path`).
    data_dir:       folder with train.csv[.gz], test.csv[.gz], corpus.txt[.gz]; relative paths are tried from the
                    working directory, then from the repo root (the parent of the `w2s_jax` package).
    csv_path:       a lichess puzzle CSV (source "lichess_csv"); train and test are split from it by game.
    test_csv_path:  optional separate test CSV for source "lichess_csv".
    corpus_path:    optional pretraining corpus (one game per line) overriding data_dir's corpus.txt.
    prompt_format:  "transcript" (the paper's), "fen", or "auto" (transcript when a row has one, else FEN).
    n_train:        total training examples (the pipeline halves them itself); -1 = all available.
    n_test:         test examples; -1 = all available (not with a single lichess CSV).
    max_corpus_games: -1 = all.
    on_bad_row:     "skip" (log file:line) or "raise".
    seed:           the subsampling/splitting seed.
    generator:      chess_gen's config; used when `generator.generate_if_missing` and data_dir is absent.
    """
    from w2s_jax.data import chess_gen  # local import: chess_gen imports this module

    cfg = ml_collections.ConfigDict()
    cfg.name = "chess"
    cfg.source = "generated"
    cfg.data_dir = "data/chess/tiny"
    cfg.csv_path = ""
    cfg.test_csv_path = ""
    cfg.corpus_path = ""
    cfg.prompt_format = "transcript"
    cfg.n_train = 4000
    cfg.n_test = 500
    cfg.max_corpus_games = -1
    cfg.on_bad_row = "skip"
    cfg.seed = 0
    cfg.generator = chess_gen.default_generator_config()
    return cfg


def resolve_path(path, key):
    """A configured path: absolute, or relative to the working directory, else to the repo root."""
    if not path:
        raise UserError(f"task.{key} is empty")
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def _require(path, key):
    if not path.exists():
        raise MissingFile(f"task.{key}: {path} does not exist")
    return path


def _take(path, rows, n, on_error, key):
    """Parses `rows` in order until `n` good puzzles (all when n < 0): only what is used gets parsed."""
    records = []
    for row in rows:
        if 0 <= n <= len(records):
            break
        record = _parse_or_report(path, row, on_error)
        if record is not None:
            records.append(record)
    if n > len(records):
        raise UserError(f"task.{key} = {n} but {path} has only {len(records)} valid puzzles")
    return records


def _shuffled_rows(path, rng):
    rows = _csv_rows(path)
    rng.shuffle(rows)
    return rows


def _game_of(row):
    line, fields = row[0], row[1]
    return game_id((fields or {}).get("GameUrl", ""), f"line {line}")


def _train_and_test(train_path, test_path, task_cfg, rng):
    """Train and test puzzles from two files. Training rows from a game that a test puzzle also comes from are
    skipped: a later puzzle's prompt holds the earlier one's position and often its solution. Returns
    (train, test, notes)."""
    train_rows, test_rows = _shuffled_rows(train_path, rng), _shuffled_rows(test_path, rng)
    test = _take(test_path, test_rows, task_cfg.n_test, task_cfg.on_bad_row, "n_test")
    test_games = {game_id(p["game_url"], p["id"]) for p in test}
    kept = [row for row in train_rows if _game_of(row) not in test_games]
    notes = []
    if len(kept) < len(train_rows):
        notes.append(f"{len(train_rows) - len(kept)} of {len(train_rows)} puzzles in {train_path.name} come from a "
                     "game of a test puzzle and were not used for training")
        logger.info(notes[-1])
    train = _take(train_path, kept, task_cfg.n_train, task_cfg.on_bad_row, "n_train")
    return train, test, notes


def _split_by_game(path, rows, task_cfg, rng):
    """Test first, then train, from whole games in a seeded order, so that no game feeds both splits."""
    games = {}
    for row in rows:
        games.setdefault(_game_of(row), []).append(row)
    groups = list(games.values())
    rng.shuffle(groups)
    n_train, n_test = task_cfg.n_train, task_cfg.n_test
    if n_test < 0:
        raise UserError("task.n_test must be >= 0 when train and test come from one CSV (task.csv_path)")
    train, test = [], []
    for group in groups:
        split = test if len(test) < n_test else train
        if split is train and 0 <= n_train <= len(train):
            break
        split.extend(r for r in (_parse_or_report(path, row, task_cfg.on_bad_row) for row in group) if r)
    if len(test) < n_test or len(train) < n_train:
        raise UserError(f"task.n_train={n_train}, task.n_test={n_test}: {path} has only "
                         f"{len(train) + len(test)} valid puzzles")
    return train[:n_train] if n_train >= 0 else train, test[:n_test]


def _load_generated(task_cfg, rng):
    data_dir = resolve_path(task_cfg.data_dir, "data_dir")
    if not data_dir.exists() and task_cfg.generator.generate_if_missing:
        from w2s_jax.data import chess_gen

        chess_gen.generate_to_dir(task_cfg.generator, data_dir)
    if not data_dir.exists():
        raise MissingFile(f"task.data_dir: {data_dir} does not exist; create it with "
                                f"`python -m w2s_jax.data.chess_gen --out {data_dir} --preset tiny` "
                                "or set task.generator.generate_if_missing=True")
    paths = {}
    for split in ("train", "test"):
        paths[split] = find_data_file(data_dir, f"{split}.csv")
        if paths[split] is None:
            raise MissingFile(f"task.data_dir: {data_dir} has no {split}.csv or {split}.csv.gz")
    train, test, notes = _train_and_test(paths["train"], paths["test"], task_cfg, rng)
    return train, test, find_data_file(data_dir, "corpus.txt"), notes


def _load_lichess(task_cfg, rng):
    csv_path = _require(resolve_path(task_cfg.csv_path, "csv_path"), "csv_path")
    if not task_cfg.test_csv_path:
        train, test = _split_by_game(csv_path, _csv_rows(csv_path), task_cfg, rng)
        return train, test, None, []
    test_path = _require(resolve_path(task_cfg.test_csv_path, "test_csv_path"), "test_csv_path")
    train, test, notes = _train_and_test(csv_path, test_path, task_cfg, rng)
    return train, test, None, notes


def load_chess_task(task_cfg):
    """Returns {"train": [Example], "test": [Example], "corpus": [game text], "notes": [str]}, deterministic from
    task_cfg.seed. Each Example's `group` is its game: no game is in both train and test, and the pipeline's
    splits keep a game's puzzles together."""
    _check_on_error(task_cfg.on_bad_row)
    rng = random.Random(task_cfg.seed)
    if task_cfg.source == "generated":
        train, test, corpus_file, notes = _load_generated(task_cfg, rng)
    elif task_cfg.source == "lichess_csv":
        train, test, corpus_file, notes = _load_lichess(task_cfg, rng)
    else:
        raise UserError(f"task.source must be 'generated' or 'lichess_csv', got {task_cfg.source!r}")
    if task_cfg.corpus_path:
        corpus_file = _require(resolve_path(task_cfg.corpus_path, "corpus_path"), "corpus_path")
    corpus = read_corpus(corpus_file) if corpus_file else []
    if task_cfg.max_corpus_games >= 0:
        corpus = corpus[:task_cfg.max_corpus_games]
    return {
        "train": puzzles_to_examples(train, task_cfg.prompt_format),
        "test": puzzles_to_examples(test, task_cfg.prompt_format),
        "corpus": corpus,
        "notes": notes,
    }
