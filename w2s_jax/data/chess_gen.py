"""Offline chess-puzzle generator: games played by Stockfish at varied strength, puzzles found in them.

Each game starts from the standard position with a book opening (Debian's gnuchess polyglot book when present),
then every move is sampled from a shallow multi-PV Stockfish search with a per-player temperature, and now and
then (at a per-player rate) a "plausible blunder" is injected: a move among the best few at the player's horizon
(1-3 plies) that loses at least 3 pawns a few plies deeper. Puzzle games are then searched for puzzle positions by
three rules (modes):

  lichess    lichess-puzzler's rules: the opponent's move was a mistake (win-chance jump >= 0.6 to >= +200, or a
             mate), every solver move is an only-move (win-chance gap 0.7, or a mate in one), mate and advantage
             lines, solution lines of odd length ending on a solver move (one-movers dropped unless allowed).
  only_move  any position whose best move beats the second best by a clear win-chance gap (a far higher yield).
  mate       exact unique mate-in-1 / unique-key mate-in-2 positions, proved by python-chess search alone.

Corpus games (for pretraining) are played the same way from a separate seed stream, and any corpus game that
starts with a puzzle's game prefix is dropped (`check_disjoint`). Everything is deterministic from the seed:
per-game seeds, fixed node/depth budgets, one engine thread, hash cleared per game, results in game order.

    python -m w2s_jax.data.chess_gen --out data/chess/tiny --preset tiny
"""
import argparse
import json
import math
import multiprocessing
import multiprocessing.util
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import chess
import chess.polyglot
import ml_collections

from w2s_jax.data import chess as chess_data

MODES = ("lichess", "mate", "only_move")  # also the priority when one position qualifies for several
MATE = 100_000  # a mate in n scores MATE - n for the side to move, mated in n scores -(MATE - n)
PIECE_VALUES = {chess.PAWN: 1, chess.KNIGHT: 3, chess.BISHOP: 3, chess.ROOK: 5, chess.QUEEN: 9, chess.KING: 0}
DEFAULT_BOOK = "/usr/share/games/gnuchess/book.bin"
STOCKFISH_PLACES = ("/usr/games/stockfish", "/usr/local/bin/stockfish", "/opt/homebrew/bin/stockfish")


# ----------------------------------------------------------------------------------------------- config


def default_generator_config():
    """Generator options (the `tiny` preset's values); `PRESETS` and CLI flags override them."""
    cfg = ml_collections.ConfigDict()
    cfg.generate_if_missing = False  # used by chess.load_chess_task when task.data_dir is absent
    cfg.stockfish = ""  # "" = $STOCKFISH, PATH, then /usr/games/stockfish, ...
    cfg.book = DEFAULT_BOOK  # polyglot opening book; missing -> openings from high-temperature engine moves
    cfg.seed = 0
    cfg.workers = 2
    cfg.n_train = 4000
    cfg.n_test = 500
    cfg.corpus_games = 2000
    cfg.modes = ("only_move", "mate", "lichess")
    # at most this share of the puzzles from each mode (lichess is rare: uncapped)
    cfg.mode_caps = ml_collections.ConfigDict({"only_move": 0.7, "mate": 0.4, "lichess": 1.0})
    cfg.max_puzzles_per_game = 4
    cfg.min_puzzle_spacing = 3  # plies between two puzzles of one game
    cfg.round_games = 32  # games per scheduling round (the mix depends on it, the worker count does not)
    cfg.max_puzzle_games = 20_000
    cfg.compress_over_bytes = 1_000_000  # gzip output files bigger than this
    # --- play
    cfg.book_plies_min = 4
    cfg.book_plies_max = 14
    cfg.play_depth = 4
    cfg.opening_temperature_cp = 60  # out of book / no book before the book length
    cfg.play_multipv = 3
    cfg.temperatures_cp = (10, 25, 50, 100)
    cfg.blunder_rates = (0.03, 0.06, 0.12)  # per move, after the book
    cfg.horizons = (1, 2, 3)
    cfg.blunder_candidates = 6  # the top moves at the horizon that a blunder is drawn from
    cfg.blunder_lookahead = 4  # plies beyond the horizon that expose the blunder
    cfg.plausible_margin_cp = 400
    cfg.blunder_drop_cp = 300
    cfg.max_plies = 200
    # --- detection
    cfg.min_puzzle_ply = 10
    cfg.scan_gap = 0.1  # win-chance gap in the play search that makes a position an only-move candidate
    cfg.filter_nodes = 2_000
    cfg.filter_gap = 0.3
    cfg.verify_nodes = 20_000
    cfg.mate_rating_depth = 6
    cfg.only_move_gap = 0.5
    cfg.lichess_gap = 0.7
    cfg.lichess_allow_one_move = True  # lichess v49 drops one-move puzzles (the lichess DB still has many)
    cfg.max_solution_moves = 4
    cfg.mate_max_n = 2
    cfg.min_defender_material = 4
    cfg.skip_plain_recaptures = True
    return cfg


PRESETS = {
    "tiny": {},
    # a handful of puzzles in seconds, for tests and smoke runs
    "test": {"n_train": 6, "n_test": 3, "corpus_games": 3, "round_games": 4, "verify_nodes": 20_000,
             "max_puzzle_games": 40, "workers": 1},
    # the paper's sizes (50k + 50k train, 5k test): hours on 2 cores
    "paper": {"n_train": 100_000, "n_test": 5_000, "corpus_games": 100_000, "max_puzzle_games": 400_000,
              "mode_caps": {"only_move": 0.6, "mate": 0.3, "lichess": 1.0}},
}


def preset_config(name, **overrides):
    cfg = default_generator_config()
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    cfg.update(PRESETS[name])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


# ----------------------------------------------------------------------------------------------- engine


class StockfishNotFound(FileNotFoundError):
    pass


def find_stockfish(path=""):
    """The Stockfish binary: `path` if given, else $STOCKFISH, PATH and the usual install places."""
    tried = [path] if path else [os.environ.get("STOCKFISH", ""), shutil.which("stockfish") or "",
                                 *STOCKFISH_PLACES]
    for candidate in tried:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise StockfishNotFound(
        f"Stockfish not found (tried {', '.join(t for t in tried if t) or 'PATH'}). Install it with "
        "`apt-get install stockfish` (Debian/Ubuntu put it in /usr/games/stockfish, which is often not on "
        "PATH) and pass its path with --stockfish PATH (config: generator.stockfish).")


def mate_score(n):
    """UCI `score mate n` as one number: mating sooner scores higher, being mated sooner scores lower."""
    return MATE - n if n > 0 else -MATE - n


def mate_in(score):
    """n for a mate in n for the side to move, else None."""
    return MATE - score if score > MATE - 1000 else None


def win_chances(score):
    """lichess-puzzler's win chance in [-1, 1] of a centipawn score; +-1 for mates."""
    if abs(score) > MATE - 1000:
        return 1.0 if score > 0 else -1.0
    return 2.0 / (1.0 + math.exp(-0.00368208 * score)) - 1.0


class Analysis:
    """A search result: `lines` = [(uci, score)] by multi-PV rank, `best_by_depth` = PV[0] per completed depth."""

    def __init__(self, lines, best_by_depth):
        self.lines = lines
        self.best_by_depth = best_by_depth

    @property
    def best(self):
        return self.lines[0][0]

    @property
    def score(self):
        return self.lines[0][1]

    def gap(self):
        """Win-chance gap between the best and the second line (2.0 when there is no second move)."""
        if len(self.lines) < 2:
            return 2.0
        return win_chances(self.lines[0][1]) - win_chances(self.lines[1][1])


def _parse_info(tokens):
    """(depth, multipv, score, first pv move) of a UCI info line with a score and a PV, else None.

    A bound (`lowerbound`/`upperbound`, printed for a line whose re-search the node limit cut short) is taken
    as the score, as python-chess does."""
    if "pv" not in tokens or "score" not in tokens:
        return None
    at = tokens.index("score")
    value = int(tokens[at + 2])
    score = value if tokens[at + 1] == "cp" else mate_score(value)
    multipv = int(tokens[tokens.index("multipv") + 1]) if "multipv" in tokens else 1
    return int(tokens[tokens.index("depth") + 1]), multipv, score, tokens[tokens.index("pv") + 1]


class UciEngine:
    """A minimal UCI client over pipes.

    python-chess's `chess.engine` parses every PV into moves on a board; for the thousands of shallow searches a
    game needs, that overhead is 4x the search itself (measured here: depth-3 multi-PV 4 takes 1.8 ms through
    chess.engine and 0.43 ms over raw pipes). This client reads only what the generator uses.
    """

    def __init__(self, path, hash_mb=16):
        self.path = path
        self.proc = subprocess.Popen([path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self._send("uci")
        self._read_until("uciok")
        self.version = self._id_name
        self._send("setoption name Threads value 1")
        self._send(f"setoption name Hash value {hash_mb}")
        self._multipv = None
        self.new_game()

    def _send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _read_until(self, prefix):
        lines = []
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"Stockfish ({self.path}) exited unexpectedly")
            if line.startswith("id name "):
                self._id_name = line[8:].strip()
            lines.append(line)
            if line.startswith(prefix):
                return lines

    def new_game(self):
        """Clears the hash and history so that the next searches do not depend on earlier ones."""
        self._send("ucinewgame")
        self._send("isready")
        self._read_until("readyok")

    def analyse(self, moves, *, nodes=None, depth=None, multipv=1, searchmoves=(), fen=None):
        """Searches the position after `moves` (UCI strings) from the start (or from `fen`)."""
        if multipv != self._multipv:
            self._send(f"setoption name MultiPV value {multipv}")
            self._multipv = multipv
        start = f"fen {fen}" if fen else "startpos"
        self._send(f"position {start} moves {' '.join(moves)}" if moves else f"position {start}")
        limit = f"nodes {nodes}" if nodes else f"depth {depth}"
        self._send(f"go {limit}" + (f" searchmoves {' '.join(searchmoves)}" if searchmoves else ""))
        block, best_by_depth = [], {}
        for line in self._read_until("bestmove"):
            parsed = _parse_info(line.split()) if line.startswith("info") else None
            if parsed is None:
                continue
            line_depth, rank, score, move = parsed
            if rank == 1:  # Stockfish prints the lines rank by rank: a new block starts
                block = []
                best_by_depth[line_depth] = move
            if all(move != m for m, _ in block):
                block.append((move, score))
        return Analysis(block, [best_by_depth[d] for d in sorted(best_by_depth)])

    def close(self):
        if self.proc.poll() is None:
            try:
                self._send("quit")
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


# ----------------------------------------------------------------------------------------------- exact mates


def mating_moves(board):
    """Every move that checkmates at once."""
    mates = []
    for move in board.legal_moves:
        if board.gives_check(move):
            board.push(move)
            if board.is_checkmate():
                mates.append(move)
            board.pop()
    return mates


def _has_mate_in_one(board):
    for move in board.legal_moves:
        if board.gives_check(move):
            board.push(move)
            mate = board.is_checkmate()
            board.pop()
            if mate:
                return True
    return False


def forces_mate_in_two(board, move):
    """True if after `move` every defence allows a mate in one (or `move` itself mates)."""
    board.push(move)
    try:
        if board.is_checkmate():
            return True
        replies = list(board.legal_moves)
        if not replies:  # stalemate
            return False
        for reply in replies:
            board.push(reply)
            mates = _has_mate_in_one(board)
            board.pop()
            if not mates:
                return False
        return True
    finally:
        board.pop()


def mate_in_two_keys(board, limit=2):
    """Up to `limit` first moves that force mate in at most two (exhaustive python-chess search)."""
    keys = []
    for move in board.legal_moves:
        if forces_mate_in_two(board, move):
            keys.append(move)
            if len(keys) >= limit:
                break
    return keys


def stubbornest_defence(board):
    """The reply that leaves the attacker the fewest mates in one (ties: the smallest UCI string)."""
    def mates_after(reply):
        board.push(reply)
        count = len(mating_moves(board))
        board.pop()
        return count, reply.uci()
    return min(board.legal_moves, key=mates_after)


def exact_mate_line(board, max_n):
    """The solution line (moves) of a unique mate in 1, or of a mate in 2 with a unique key, else None."""
    mates = mating_moves(board)
    if len(mates) == 1:
        return [mates[0]]
    if mates or max_n < 2:
        return None
    keys = mate_in_two_keys(board, limit=2)
    if len(keys) != 1:
        return None
    board = board.copy(stack=False)
    board.push(keys[0])
    defence = stubbornest_defence(board)
    board.push(defence)
    finish = min(mating_moves(board), key=lambda m: m.uci())
    return [keys[0], defence, finish]


# ----------------------------------------------------------------------------------------------- play


def material(board, color):
    return sum(PIECE_VALUES[p.piece_type] for p in board.piece_map().values() if p.color == color)


def _player_profiles(rng, cfg):
    """Per-colour style: sampling temperature, blunder rate and blunder horizon."""
    return {color: {"temperature": rng.choice(cfg.temperatures_cp), "blunder_rate": rng.choice(cfg.blunder_rates),
                    "horizon": rng.choice(cfg.horizons)}
            for color in (chess.WHITE, chess.BLACK)}


def _sample_softmax(lines, temperature, rng):
    """A move from [(uci, score)] with probability proportional to exp(score / temperature)."""
    scores = [max(-2000, min(2000, s)) for _, s in lines]
    top = max(scores)
    weights = [math.exp((s - top) / temperature) for s in scores]
    return rng.choices([m for m, _ in lines], weights=weights)[0]


def _plausible_blunder(engine, moves, profile, rng, cfg):
    """A move that looks within `plausible_margin_cp` of the best at the player's horizon but loses at least
    `blunder_drop_cp` a few plies deeper, with the deeper scores (best, blunder); None when there is none."""
    shallow = engine.analyse(moves, depth=profile["horizon"], multipv=cfg.blunder_candidates)
    if len(shallow.lines) < 2:
        return None
    plausible = [m for m, s in shallow.lines[1:] if s >= shallow.score - cfg.plausible_margin_cp]
    if not plausible:
        return None
    deep = engine.analyse(moves, depth=profile["horizon"] + cfg.blunder_lookahead, multipv=len(plausible) + 1,
                          searchmoves=[shallow.best] + plausible)
    losing = [(m, s) for m, s in deep.lines if m in plausible and s <= deep.score - cfg.blunder_drop_cp]
    if not losing:
        return None
    move, score = rng.choice(losing)
    return move, deep.score, score


def heuristic_move(board, rng):
    """The engine-free player (mate mode without Stockfish): mates often, grabs material, checks, else random."""
    moves = list(board.legal_moves)
    mates = mating_moves(board)
    if mates and rng.random() < 0.7:
        return rng.choice(mates)
    roll = rng.random()
    if roll < 0.45:
        def gain(move):
            victim = board.piece_at(move.to_square)
            value = PIECE_VALUES[victim.piece_type] if victim else (1 if board.is_en_passant(move) else 0)
            risk = PIECE_VALUES[board.piece_type_at(move.from_square)]
            return value - (risk if board.is_attacked_by(not board.turn, move.to_square) else 0)
        captures = [m for m in moves if board.is_capture(m) and gain(m) >= 0]
        if captures:
            best = max(gain(m) for m in captures)
            return rng.choice([m for m in captures if gain(m) == best])
    elif roll < 0.6:
        checks = [m for m in moves if board.gives_check(m)]
        if checks:
            return rng.choice(checks)
    return rng.choice(moves)


def _book_move(book, board, rng):
    try:
        return book.weighted_choice(board, random=rng).move.uci()
    except IndexError:  # out of book
        return None


def play_game(engine, book, rng, cfg, analyse_book_plies=False):
    """One game from the standard position.

    Returns {"moves": UCI list, "analyses": {ply: the play search}, "evals": {ply: score for the side to move},
    "blunders": plies where a plausible blunder was played}.
    Every engine move is sampled from a `play_depth` multi-PV search; puzzle detection reuses those searches
    (and the deeper scores around injected blunders) as its cheap first scan.
    """
    board = chess.Board()
    moves, analyses, evals, blunders = [], {}, {}, []
    profiles = _player_profiles(rng, cfg)
    book_plies = rng.randint(cfg.book_plies_min, cfg.book_plies_max)
    while not board.is_game_over() and not board.is_repetition(3) and len(moves) < cfg.max_plies:
        ply, profile = len(moves), profiles[board.turn]
        in_book = ply < book_plies
        move = _book_move(book, board, rng) if in_book and book is not None else None
        if engine is None:
            move = move or heuristic_move(board, rng).uci()
        else:
            if move is None or analyse_book_plies:
                analyses[ply] = engine.analyse(moves, depth=cfg.play_depth, multipv=cfg.play_multipv)
                evals.setdefault(ply, analyses[ply].score)  # a blunder's deeper score stays
            blunder = None
            if move is None and not in_book and rng.random() < profile["blunder_rate"]:
                blunder = _plausible_blunder(engine, moves, profile, rng, cfg)
            if blunder is not None:
                move, evals[ply], evals[ply + 1] = blunder[0], blunder[1], -blunder[2]
                blunders.append(ply)
            elif move is None:
                temperature = cfg.opening_temperature_cp if in_book else profile["temperature"]
                move = _sample_softmax(analyses[ply].lines, temperature, rng)
        board.push(chess.Move.from_uci(move))
        moves.append(move)
    return {"moves": moves, "analyses": analyses, "evals": evals, "blunders": blunders}


def san_moves(moves):
    board = chess.Board()
    sans = []
    for uci in moves:
        move = chess.Move.from_uci(uci)
        sans.append(board.san(move))
        board.push(move)
    return sans


def board_after(moves):
    board = chess.Board()
    for uci in moves:
        board.push(chess.Move.from_uci(uci))
    return board


# ----------------------------------------------------------------------------------------------- detection


def stable_depth(analysis, solution):
    """The shallowest depth from which the engine's best move is the solution at every deeper depth."""
    depth = len(analysis.best_by_depth) + 1
    for d in range(len(analysis.best_by_depth), 0, -1):
        if analysis.best_by_depth[d - 1] != solution:
            break
        depth = d
    return depth


def difficulty_rating(depth, solver_moves, quiet, takes_last_mover):
    """A heuristic, uncalibrated difficulty on the lichess scale (400-2800): deeper-to-find, longer and quieter
    solutions are harder, taking the piece that just moved is easier."""
    rating = 500 + 120 * (depth - 1) + 150 * (solver_moves - 1) + 150 * quiet - 100 * takes_last_mover
    return int(max(400, min(2800, rating)))


def _balance(board, color):
    return material(board, color) - material(board, not color)


def _is_plain_recapture(board, move):
    """The solution takes back on the square where the opponent just captured, restoring the material balance."""
    if not board.move_stack or not board.is_capture(move):
        return False
    previous = board.peek()
    prior = board.copy()
    prior.pop()
    if move.to_square != previous.to_square or not prior.is_capture(previous):
        return False
    after = board.copy(stack=False)
    after.push(move)
    return _balance(after, board.turn) == _balance(prior, board.turn)


def _phase(board, ply):
    non_pawn = sum(PIECE_VALUES[p.piece_type] for p in board.piece_map().values() if p.piece_type != chess.PAWN)
    return "opening" if ply < 20 else "endgame" if non_pawn <= 26 else "middlegame"


def _themes(board, ply, mode, line, score):
    """lichess-style tags of a puzzle: mode, eval (mate/crushing/advantage/equality), length, phase, motifs."""
    solver_moves = (len(line) + 1) // 2
    end = board.copy(stack=False)
    for move in line:
        end.push(move)
    first = line[0]
    themes = [f"mode_{mode}"]
    if end.is_checkmate():
        themes += ["mate", f"mateIn{solver_moves}"]
    else:
        themes.append("crushing" if score >= 600 else "advantage" if score >= 200 else "equality")
        if score < 200:
            themes.append("defensiveMove")
    themes.append({1: "oneMove", 2: "short", 3: "long"}.get(solver_moves, "veryLong"))
    themes.append(_phase(board, ply))
    if not board.is_capture(first) and not board.gives_check(first):
        themes.append("quietMove")
    return themes


class _GameScan:
    """One played puzzle game with what the detectors share: the play searches as a first scan, the evals,
    and the material balance for the side to move."""

    def __init__(self, played, engine, cfg):
        self.moves = played["moves"]
        self.scans = played["analyses"]
        self.evals = played["evals"]
        self.after_blunder = {p + 1 for p in played["blunders"]}
        self.engine = engine
        self.cfg = cfg
        self.balance, self.fens = {}, []
        board = chess.Board()
        for ply, move in enumerate(self.moves):
            self.fens.append(board.fen())
            if ply >= cfg.min_puzzle_ply and board.legal_moves.count() >= 2:
                self.balance[ply] = _balance(board, board.turn)
            board.push(chess.Move.from_uci(move))

    def plies(self):
        return sorted(self.balance)

    def board(self, ply, full_history=False):
        """The position before move `ply`; its move stack holds the opponent's last move (or the whole game)."""
        if full_history:
            return board_after(self.moves[:ply])
        board = chess.Board(self.fens[ply - 1])
        board.push(chess.Move.from_uci(self.moves[ply - 1]))
        return board


def _candidates(game, modes):
    """(mode, ply) pairs worth verifying: from the play searches, plus every position after an injected
    blunder (or, without an engine, every position for mates)."""
    found = []
    for ply in game.plies():
        scan = game.scans.get(ply)
        if scan is None:
            if "mate" in modes and game.engine is None:
                found.append(("mate", ply))
            continue
        n = mate_in(scan.score)
        if "lichess" in modes and _lichess_branch(game, ply):
            found.append(("lichess", ply))
        if "mate" in modes and n is not None and n <= game.cfg.mate_max_n:
            found.append(("mate", ply))
        elif "only_move" in modes and (scan.gap() >= game.cfg.scan_gap or ply in game.after_blunder):
            found.append(("only_move", ply))
    return found


def _lichess_branch(game, ply):
    """'mate' or 'advantage' when the opponent's last move was a lichess-puzzler mistake, else None."""
    if ply - 1 not in game.evals or ply not in game.evals:
        return None
    previous, score = -game.evals[ply - 1], game.evals[ply]
    if game.balance[ply] > 0:  # already up in material
        return None
    n = mate_in(score)
    if n is not None and n <= 15:
        return "mate"
    if previous > 300 or score < 200 or win_chances(score) <= win_chances(previous) + 0.6:
        return None
    if score < 400 and game.balance[ply] >= 0:  # a small edge must come from being down material
        return None
    return "advantage"


def _puzzle(game, ply, mode, line, score, depth):
    board = game.board(ply)
    previous = chess.Move.from_uci(game.moves[ply - 1])
    themes = _themes(board, ply, mode, line, score)
    takes_last_mover = board.is_capture(line[0]) and line[0].to_square == previous.to_square
    rating = difficulty_rating(depth, (len(line) + 1) // 2, "quietMove" in themes, takes_last_mover)
    return {"ply": ply, "mode": mode, "line": [m.uci() for m in line], "themes": themes, "rating": rating,
            "stable_depth": depth}


def _only_move_puzzle(game, ply):
    """A quick `filter_nodes` search weeds out most candidates (and plain recaptures) before the
    `verify_nodes` search (fresh hash) that decides and rates."""
    cfg = game.cfg
    board = game.board(ply)
    quick = game.engine.analyse(game.moves[:ply], nodes=cfg.filter_nodes, multipv=2)
    if quick.gap() < cfg.filter_gap or len(quick.lines) < 2:
        return None
    if cfg.skip_plain_recaptures and _is_plain_recapture(board, chess.Move.from_uci(quick.best)):
        return None
    game.engine.new_game()
    analysis = game.engine.analyse(game.moves[:ply], nodes=cfg.verify_nodes, multipv=2)
    if len(analysis.lines) < 2 or analysis.gap() < cfg.only_move_gap:
        return None
    best = chess.Move.from_uci(analysis.best)
    if cfg.skip_plain_recaptures and _is_plain_recapture(board, best):
        return None
    return _puzzle(game, ply, "only_move", [best], analysis.score, stable_depth(analysis, analysis.best))


def _mate_puzzle(game, ply):
    cfg = game.cfg
    board = game.board(ply)
    if material(board, not board.turn) < cfg.min_defender_material:
        return None
    line = exact_mate_line(board, cfg.mate_max_n)
    if line is None:
        return None
    depth = 1 + (len(line) > 1)
    if game.engine is not None:
        game.engine.new_game()
        depth = stable_depth(game.engine.analyse(game.moves[:ply], depth=cfg.mate_rating_depth), line[0].uci())
    return _puzzle(game, ply, "mate", line, MATE, depth)


def _passes_only_move(analysis, gap):
    """lichess-puzzler's only-move test: no second move, a mate in one whose alternative is no mate-like
    win (<= 0.6 win chance, other mates are fine), or a win-chance gap."""
    if len(analysis.lines) < 2:
        return True
    second = analysis.lines[1][1]
    if mate_in(analysis.score) == 1:
        return mate_in(second) == 1 or win_chances(second) <= 0.6
    return analysis.gap() > gap


def _lichess_puzzle(game, ply):
    """Builds a lichess-puzzler line from `ply`: only-moves for the solver, the engine's best replies."""
    cfg = game.cfg
    branch = _lichess_branch(game, ply)
    board = game.board(ply, full_history=True)  # for the repetition test
    history = list(game.moves[:ply])
    line, forced, first = [], [], None
    game.engine.new_game()
    for _ in range(cfg.max_solution_moves):
        analysis = game.engine.analyse(history, nodes=cfg.verify_nodes, multipv=2)
        first = first or analysis
        if not _passes_only_move(analysis, cfg.lichess_gap):
            break
        if (branch == "mate" and mate_in(analysis.score) is None) or (branch == "advantage" and analysis.score < 200):
            return None
        forced.append(len(analysis.lines) < 2)
        line.append(chess.Move.from_uci(analysis.best))
        board.push(line[-1])
        history.append(analysis.best)
        if board.is_checkmate():
            break
        if board.is_game_over() or board.is_repetition(2):
            return None
        reply = game.engine.analyse(history, nodes=cfg.verify_nodes, multipv=1)
        line.append(chess.Move.from_uci(reply.best))
        board.push(line[-1])
        history.append(reply.best)
    if branch == "mate" and not board.is_checkmate():
        return None
    if len(line) % 2 == 0:  # end on a solver move
        line = line[:-1]
    while branch == "advantage" and line and forced[(len(line) - 1) // 2]:  # ... that had an alternative
        line = line[:-2]
    if not line or (len(line) == 1 and not cfg.lichess_allow_one_move):
        return None
    return _puzzle(game, ply, "lichess", line, first.score, stable_depth(first, line[0].uci()))


def find_puzzles(played, engine, cfg, modes):
    """Puzzles of one game: at most `max_puzzles_per_game`, `min_puzzle_spacing` plies apart. Candidates are
    tried in game order (the engine's hash then carries over from one ply to the next, which makes the quick
    filter searches far more telling) and, at one ply, by mode priority (lichess, mate, only_move)."""
    game = _GameScan(played, engine, cfg)
    candidates = sorted(_candidates(game, modes), key=lambda c: (c[1], MODES.index(c[0])))
    build = {"lichess": _lichess_puzzle, "mate": _mate_puzzle, "only_move": _only_move_puzzle}
    puzzles = []
    for mode, ply in candidates:
        if len(puzzles) >= cfg.max_puzzles_per_game:
            break
        if any(abs(ply - p["ply"]) < cfg.min_puzzle_spacing for p in puzzles):
            continue
        puzzle = build[mode](game, ply)
        if puzzle is not None:
            puzzles.append(puzzle)
    return puzzles


# ----------------------------------------------------------------------------------------------- workers


_WORKER = {}


def _init_worker(cfg_dict, engine_path, in_pool=False):
    if in_pool:  # quit the engine (and wait for it) when the worker exits
        multiprocessing.util.Finalize(None, _close_worker, exitpriority=10)
    cfg = ml_collections.ConfigDict(cfg_dict)
    _WORKER["cfg"] = cfg
    _WORKER["engine"] = UciEngine(engine_path) if engine_path else None
    _WORKER["book"] = chess.polyglot.open_reader(cfg.book) if cfg.book and os.path.exists(cfg.book) else None


def _close_worker():
    if _WORKER.get("engine"):
        _WORKER["engine"].close()
    if _WORKER.get("book"):
        _WORKER["book"].close()
    _WORKER.clear()


def game_seed(seed, stream, index):
    return f"{seed}:{stream}:{index}"


def run_game(task):
    """Plays game `index` of `stream` ("puzzle" or "corpus") and finds its puzzles in `modes`."""
    stream, index, modes = task
    cfg, engine = _WORKER["cfg"], _WORKER["engine"]
    rng = random.Random(game_seed(cfg.seed, stream, index))
    if engine is not None:
        engine.new_game()
    played = play_game(engine, _WORKER["book"], rng, cfg, analyse_book_plies=bool(modes))
    puzzles = find_puzzles(played, engine, cfg, modes) if modes else []
    moves = played["moves"]
    return {"stream": stream, "index": index, "moves": moves, "sans": san_moves(moves), "puzzles": puzzles}


class _Runner:
    """Runs game tasks in order, in this process (workers=1) or a pool of spawned workers (one engine each)."""

    def __init__(self, cfg, engine_path):
        args = (cfg.to_dict(), engine_path)
        self.pool = None
        if cfg.workers > 1:
            context = multiprocessing.get_context("spawn")
            self.pool = context.Pool(cfg.workers, initializer=_init_worker, initargs=args + (True,))
        else:
            _init_worker(*args)

    def map(self, tasks):
        if self.pool is None:
            return [run_game(t) for t in tasks]
        return self.pool.map(run_game, tasks, chunksize=1)

    def close(self):
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
        else:
            _close_worker()


# ----------------------------------------------------------------------------------------------- assembly


def puzzle_row(game, puzzle, seed):
    """A lichess CSV row (plus Transcript) for one puzzle. Popularity/NbPlays/RatingDeviation are placeholders."""
    ply = puzzle["ply"]
    return {
        "PuzzleId": f"s{seed}g{game['index']:05d}p{ply:03d}",
        "FEN": board_after(game["moves"][:ply - 1]).fen(),
        "Moves": " ".join([game["moves"][ply - 1]] + puzzle["line"]),
        "Rating": puzzle["rating"],
        "RatingDeviation": 500,
        "Popularity": 0,
        "NbPlays": 0,
        "Themes": " ".join(puzzle["themes"]),
        "GameUrl": f"synthetic:seed{seed}/{game['stream']}{game['index']}#{ply}",
        "OpeningTags": "",
        "Transcript": " ".join(game["sans"][:ply]),
    }


def _position_key(game, ply):
    return " ".join(board_after(game["moves"][:ply]).fen(en_passant="legal").split()[:4])


def _collect_puzzles(runner, cfg, log):
    """Plays puzzle games in rounds until `n_train + n_test` (+ one game's worth) puzzles are accepted.

    A round's games get the modes still under their caps when the round starts, and results are accepted in
    game order, so the outcome does not depend on the number of workers or their timing.
    """
    target = cfg.n_train + cfg.n_test + cfg.max_puzzles_per_game
    caps = {m: math.floor(cfg.mode_caps[m] * target) for m in cfg.modes}
    counts = Counter()
    accepted, games, seen = [], [], set()
    start = time.time()
    next_index = 0
    while len(accepted) < target and next_index < cfg.max_puzzle_games:
        needed = tuple(m for m in cfg.modes if counts[m] < caps[m])
        if not needed:
            break
        tasks = [("puzzle", next_index + k, needed) for k in range(cfg.round_games)]
        next_index += cfg.round_games
        for game in runner.map(tasks):
            game["accepted"] = []
            for puzzle in game["puzzles"]:
                key = _position_key(game, puzzle["ply"])
                if len(accepted) < target and counts[puzzle["mode"]] < caps[puzzle["mode"]] and key not in seen:
                    seen.add(key)
                    counts[puzzle["mode"]] += 1
                    game["accepted"].append(puzzle)
                    accepted.append((game["index"], puzzle))
            games.append(game)
        log(f"[chess_gen] {next_index} puzzle games, {len(accepted)}/{target} puzzles {dict(counts)}, "
            f"{time.time() - start:.0f}s")
    return games


def _split_games(games, cfg):
    """Whole games to test (in a seeded order) until it has n_test puzzles, the rest to train."""
    with_puzzles = [g for g in games if g["accepted"]]
    order = list(range(len(with_puzzles)))
    random.Random(f"{cfg.seed}:split").shuffle(order)
    test_games, n_test = set(), 0
    for i in order:
        if n_test >= cfg.n_test:
            break
        test_games.add(with_puzzles[i]["index"])
        n_test += len(with_puzzles[i]["accepted"])
    train, test = [], []
    for game in with_puzzles:
        rows = [puzzle_row(game, p, cfg.seed) for p in game["accepted"]]
        (test if game["index"] in test_games else train).extend(rows)
    return train[:cfg.n_train], test[:cfg.n_test]


def check_disjoint(corpus, puzzles):
    """Overlaps between pretraining games and puzzle games: (corpus index, puzzle id) for every corpus game that
    starts with a puzzle's game prefix (its transcript up to the opponent's move), which includes sharing the
    puzzle's whole game. `corpus` holds numbered game texts; `puzzles` are records with `id` and `transcript`
    (SAN list) or CSV rows with `PuzzleId` and `Transcript`. Empty when disjoint."""
    prefixes = {}
    for p in puzzles:
        sans = p["transcript"] if "transcript" in p else p["Transcript"].split()
        prefixes.setdefault(" ".join(sans or ()), []).append(p["id"] if "id" in p else p["PuzzleId"])
    prefixes.pop("", None)
    overlaps = []
    for index, text in enumerate(corpus):
        prefix = ""
        for san in chess_data.parse_transcript(text):
            prefix = f"{prefix} {san}" if prefix else san
            overlaps.extend((index, puzzle_id) for puzzle_id in prefixes.get(prefix, ()))
    return overlaps


def _rating_histogram(rows):
    return dict(sorted(Counter(f"{200 * (r['Rating'] // 200)}-{200 * (r['Rating'] // 200) + 199}"
                               for r in rows).items(), key=lambda kv: int(kv[0].split("-")[0])))


def _solution_features(rows):
    """Shares of puzzles whose first solution move captures, takes the piece that just moved, checks, is quiet."""
    counts = Counter()
    for row in rows:
        board = chess.Board(row["FEN"])
        opponent, *solution = [chess.Move.from_uci(m) for m in row["Moves"].split()]
        board.push(opponent)
        move = solution[0]
        capture, check = board.is_capture(move), board.gives_check(move)
        counts["capture"] += capture
        counts["takes_piece_that_just_moved"] += capture and move.to_square == opponent.to_square
        counts["check"] += check
        counts["quiet"] += not capture and not check
    return {k: round(v / max(1, len(rows)), 3) for k, v in sorted(counts.items())}


def _split_stats(rows):
    themes = Counter(t for r in rows for t in r["Themes"].split())
    modes = Counter(t[5:] for r in rows for t in r["Themes"].split() if t.startswith("mode_"))
    ratings = sorted(r["Rating"] for r in rows)
    return {
        "puzzles": len(rows),
        "games": len({r["GameUrl"].split("#")[0] for r in rows}),
        "modes": dict(modes),
        "themes": dict(themes.most_common()),
        "rating_histogram": _rating_histogram(rows),
        "solution_features": _solution_features(rows),
        "rating_quartiles": [ratings[int(q * (len(ratings) - 1))] for q in (0, 0.25, 0.5, 0.75, 1)] if rows else [],
    }


def _assemble_corpus(corpus_games, puzzle_games, puzzles, seed):
    """The corpus stream's games plus the puzzle-stream games that gave no puzzle, minus every game that
    overlaps a puzzle (`check_disjoint`); returns (texts, stats)."""
    used = {p["GameUrl"].split("#")[0] for p in puzzles}
    recycled = [g for g in puzzle_games if f"synthetic:seed{seed}/puzzle{g['index']}" not in used]
    candidates = [chess_data.numbered_transcript(g["sans"]) for g in corpus_games + recycled]
    overlapping = {i for i, _ in check_disjoint(candidates, puzzles)}
    corpus = [text for i, text in enumerate(candidates) if i not in overlapping]
    plies = sum(len(g["sans"]) for i, g in enumerate(corpus_games + recycled) if i not in overlapping)
    stats = {"games": len(corpus), "from_corpus_stream": len(corpus_games),
             "recycled_puzzle_games_without_puzzles": len(recycled), "dropped_for_overlap": len(overlapping),
             "characters": sum(len(t) + 1 for t in corpus), "mean_plies": round(plies / max(1, len(corpus)), 1)}
    return corpus, stats


def _cpu_seconds():
    """CPU time of this process and its finished children (the workers and their engines)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def generate(cfg, log=print, command=None):
    """Generates {"train": rows, "test": rows, "corpus": texts, "stats": dict} (see the module docstring)."""
    start, cpu_start = time.time(), _cpu_seconds()
    modes = tuple(cfg.modes)
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"generator.modes: unknown mode(s) {sorted(unknown)}; choose from {MODES}")
    try:
        engine_path = find_stockfish(cfg.stockfish)
    except StockfishNotFound:
        if set(modes) != {"mate"}:
            raise
        log("[chess_gen] Stockfish not found: mate mode with the engine-free heuristic player")
        engine_path = None
    runner = _Runner(cfg, engine_path)
    try:
        games = _collect_puzzles(runner, cfg, log)
        puzzle_seconds = time.time() - start
        train, test = _split_games(games, cfg)
        if len(train) < cfg.n_train or len(test) < cfg.n_test:
            log(f"[chess_gen] WARNING: only {len(train)} train / {len(test)} test puzzles: max_puzzle_games "
                f"({cfg.max_puzzle_games}) was reached or mode_caps ({cfg.mode_caps.to_dict()}) sum below 1")
        corpus_results = runner.map([("corpus", j, ()) for j in range(cfg.corpus_games)])
    finally:
        runner.close()
    corpus, corpus_stats = _assemble_corpus(corpus_results, games, train + test, cfg.seed)
    stats = {
        "command": command or " ".join(sys.argv),
        "seconds": round(time.time() - start, 1),
        "puzzle_seconds": round(puzzle_seconds, 1),
        "cpu_seconds": round(_cpu_seconds() - cpu_start, 1),
        "stockfish": engine_path and _engine_version(engine_path),
        "book": cfg.book if cfg.book and os.path.exists(cfg.book) else None,
        "puzzle_games_played": len(games),
        "train": _split_stats(train),
        "test": _split_stats(test),
        "corpus": corpus_stats,
        "config": cfg.to_dict(),
    }
    return {"train": train, "test": test, "corpus": corpus, "stats": stats}


def _engine_version(path):
    engine = UciEngine(path)
    engine.close()
    return engine.version


def write_outputs(result, out_dir, compress_over_bytes=1_000_000):
    """Writes train.csv, test.csv, corpus.txt (each gzipped when bigger than `compress_over_bytes`) and
    stats.json; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("train.csv", "test.csv", "corpus.txt"):
        for name in (stale, stale + ".gz"):
            (out_dir / name).unlink(missing_ok=True)
    chess_data.write_lichess_csv(out_dir / "train.csv", result["train"])
    chess_data.write_lichess_csv(out_dir / "test.csv", result["test"])
    (out_dir / "corpus.txt").write_text("".join(t + "\n" for t in result["corpus"]), encoding="utf-8")
    written = []
    for name in ("train.csv", "test.csv", "corpus.txt"):
        path = out_dir / name
        if path.stat().st_size > compress_over_bytes:
            with chess_data.open_text(str(path) + ".gz", "wt") as f:
                f.write(path.read_text(encoding="utf-8"))
            path.unlink()
            path = Path(str(path) + ".gz")
        written.append(path)
    stats_path = out_dir / "stats.json"
    stats_path.write_text(json.dumps(result["stats"], indent=1) + "\n", encoding="utf-8")
    return written + [stats_path]


def generate_to_dir(cfg, out_dir, log=print, command=None):
    result = generate(cfg, log, command)
    return write_outputs(result, out_dir, cfg.compress_over_bytes)


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m w2s_jax.data.chess_gen", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (train.csv, test.csv, corpus.txt, stats.json)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int)
    parser.add_argument("--workers", type=int, help="processes, one Stockfish (1 thread) each")
    parser.add_argument("--stockfish", help="path to the Stockfish binary (Debian: /usr/games/stockfish)")
    parser.add_argument("--book", help="polyglot opening book ('' for none)")
    parser.add_argument("--n-train", type=int)
    parser.add_argument("--n-test", type=int)
    parser.add_argument("--corpus-games", type=int)
    parser.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--mode-caps", help="max share per mode, e.g. only_move=0.6,mate=0.4,lichess=1")
    parser.add_argument("--verify-nodes", type=int)
    parser.add_argument("--max-puzzle-games", type=int)
    return parser.parse_args(argv)


def main(argv=None):
    args = _parse_args(argv)
    cfg = preset_config(args.preset, seed=args.seed, workers=args.workers, stockfish=args.stockfish,
                        book=args.book, n_train=args.n_train, n_test=args.n_test, corpus_games=args.corpus_games,
                        verify_nodes=args.verify_nodes,
                        max_puzzle_games=args.max_puzzle_games)
    if args.modes:
        cfg.modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if args.mode_caps:
        for item in args.mode_caps.split(","):
            mode, share = item.split("=")
            cfg.mode_caps[mode.strip()] = float(share)
    try:
        command = "python -m w2s_jax.data.chess_gen " + " ".join(sys.argv[1:] if argv is None else argv)
        paths = generate_to_dir(cfg, args.out, command=command)
    except StockfishNotFound as e:
        sys.exit(f"error: {e}")
    print("[chess_gen] wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
