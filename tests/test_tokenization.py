"""The byte-level BPE trainer: special ids, round trips, determinism, saving, whole SAN moves as tokens."""
import random

import chess
import pytest
from transformers import AutoTokenizer

from w2s_jax.data import chess as cd
from w2s_jax.data.tokenization import single_token_fraction, train_tokenizer

ENGLISH = ["The quick brown fox jumps over the lazy dog.", "Is the sky blue?  Yes,\tit is!\n", "naïve café — 42%"]


def random_games(n, plies=40, seed=0):
    """Numbered transcripts of random legal games (a stand-in corpus that needs no engine)."""
    rng = random.Random(seed)
    games = []
    for _ in range(n):
        board, sans = chess.Board(), []
        while len(sans) < plies and not board.is_game_over():
            move = rng.choice(list(board.legal_moves))
            sans.append(board.san(move))
            board.push(move)
        games.append(cd.numbered_transcript(sans))
    return games


@pytest.fixture(scope="module")
def corpus():
    return random_games(300) + ENGLISH * 5


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus, vocab_size=800)


def test_special_token_ids(tokenizer):
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == [
        0, 1, 2, 3]
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert len(tokenizer) == 800
    with_bos = tokenizer("1. e4")["input_ids"]
    plain = tokenizer("1. e4", add_special_tokens=False)["input_ids"]
    assert with_bos == [1] + plain and 2 not in with_bos


CHESS = "1. e4 1... e5 2. Nf3 2... Nc6 3. Bb5 3..."


@pytest.mark.parametrize("text", ENGLISH + [CHESS, "", "   lead", "€𝄞 unseen"])
def test_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_same_texts_give_the_same_tokenizer(corpus, tokenizer):
    again = train_tokenizer(corpus, vocab_size=800)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    other = train_tokenizer(corpus[::-1][:200], vocab_size=800)
    assert other.backend_tokenizer.to_str() != tokenizer.backend_tokenizer.to_str()


def test_saves_and_loads_with_auto_tokenizer(corpus, tokenizer, tmp_path):
    train_tokenizer(corpus, vocab_size=800, out_dir=tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = corpus[0]
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)


def test_moves_and_move_numbers_become_single_tokens(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("1. e4 1... e5 2. Nf3 2...", add_special_tokens=False)[
        "input_ids"])
    assert tokens == ["1.", "Ġe4", "Ġ1...", "Ġe5", "Ġ2.", "ĠNf3", "Ġ2..."]
    assert single_token_fraction(tokenizer, [" e4", " Nf3", " d5", " Nc6", " 12..."]) == 1.0
    assert single_token_fraction(tokenizer, [" e4", " e4 e5"]) == 0.5  # no merge crosses a space
    assert single_token_fraction(tokenizer, []) == 0.0


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size=100 is below 260"):
        train_tokenizer(["a b"], vocab_size=100)
    with pytest.raises(ValueError, match="no texts"):
        train_tokenizer([], vocab_size=300)


@pytest.fixture(scope="module")
def san_tokenizer(corpus):
    return train_tokenizer(corpus, vocab_size=800, split="san")


def test_san_split_gives_moves_in_parts(san_tokenizer):
    text = "1. e4 1... d5 2. exd5 2... Qxd5 3. Nc3 3... Qe5+ 4. Nge2"
    tokens = san_tokenizer.convert_ids_to_tokens(san_tokenizer(text, add_special_tokens=False)["input_ids"])
    assert tokens == ["1.", "Ġ", "e4", "Ġ1...", "Ġ", "d5", "Ġ2.", "Ġex", "d5", "Ġ2...", "ĠQx", "d5", "Ġ3.",
                      "ĠN", "c3", "Ġ3...", "ĠQ", "e5", "+", "Ġ4.", "ĠNg", "e2"]
    # what a merge may cover (rare parts such as " O-O-O" need not have become one token in this small corpus)
    pieces = san_tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(" O-O-O 5. d8=Q# 5... R1xe2")
    assert [p for p, _ in pieces] == ["ĠO-O-O", "Ġ5.", "Ġ", "d8", "=Q", "#", "Ġ5...", "ĠR1x", "e2"]
    # the square that was moved to is the same token as the square a capture lands on
    assert san_tokenizer(" Nd5", add_special_tokens=False)["input_ids"][-1] == \
        san_tokenizer(" exd5", add_special_tokens=False)["input_ids"][-1]
    assert len(san_tokenizer) < 800  # the merges run out: the parts are few
    for text in ENGLISH + [CHESS, "rnbqkbnr/pppppppp/8/8/8/8/PPPPPPPP/RNBQKBNR w KQkq - 0 1"]:
        assert san_tokenizer.decode(san_tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_unknown_split_is_named(corpus):
    with pytest.raises(ValueError, match="split='chars'"):
        train_tokenizer(corpus, vocab_size=800, split="chars")
