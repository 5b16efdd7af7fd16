"""Tokenizers trained from scratch for the embedded tiny models (chess transcripts, NLP texts).

A byte-level BPE (the `tokenizers` library) wrapped as a `transformers.PreTrainedTokenizerFast`, so the rest of
the code treats it like any Hugging Face tokenizer. Special tokens: `<pad>` = 0, `<bos>` = 1, `<eos>` = 2,
`<unk>` = 3. Like LLaMA's tokenizer, encoding with `add_special_tokens=True` (the default) prepends `<bos>`;
nothing is appended.

Pre-tokenization (`split`) decides what a merge may cover:
  "word": whitespace only, keeping the leading space with the word (`" Nf3"`, `" 27..."`), so a merge can cover a
          whole SAN move; GPT-2's regex would split `" Rxe7+"` into letters, digits and punctuation.
  "san":  a SAN move in parts: what moves (piece, disambiguation, capture mark, with the leading space), the
          destination square, a promotion, the check or mate mark (`" Rx" "e7" "+"`). A square is then one token
          wherever it occurs, and `x`, `+`, `#` are visible in every move instead of hidden inside 2,000 atoms.
"""
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
SPLIT_PATTERNS = {
    "word": r" ?\S+|\s+",  # a word with its leading space, or a run of whitespace
    # move number; castling; a square; what moves to it (lookahead: a square follows); promotion; check/mate; else
    # one character (FEN, results, prose) with its leading space.
    "san": r" ?\d+\.(?:\.\.)?| ?O-O-O| ?O-O|[a-h][1-8]| ?[KQRBN]?[a-h]?[1-8]?x?(?=[a-h][1-8])|=[QRBN]|[+#]| ?\S|\s+",
}


def _byte_level_bpe(vocab_size, min_frequency, split):
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERNS[split]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    return tokenizer, trainer


def train_tokenizer(texts, vocab_size, out_dir=None, min_frequency=2, split="word"):
    """Trains a byte-level BPE of at most `vocab_size` tokens (at least the 4 specials + 256 bytes) on `texts`.

    With `split="san"` the merges run out long before a large `vocab_size`: the vocabulary is what the parts allow.

    Deterministic: the same texts give the same vocabulary and merges. When `out_dir` is given the tokenizer is
    saved there with `save_pretrained` (load it back with `transformers.AutoTokenizer.from_pretrained`).
    """
    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer: no texts to train on")
    floor = len(SPECIAL_TOKENS) + 256
    if vocab_size < floor:
        raise ValueError(f"train_tokenizer: vocab_size={vocab_size} is below {floor} (4 specials + 256 bytes)")
    if split not in SPLIT_PATTERNS:
        raise ValueError(f"train_tokenizer: split={split!r}; expected one of {sorted(SPLIT_PATTERNS)}")
    tokenizer, trainer = _byte_level_bpe(vocab_size, min_frequency, split)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos = tokenizer.token_to_id("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)])
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>",
                                           eos_token="<eos>", unk_token="<unk>")
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        hf_tokenizer.save_pretrained(str(out_dir))
    return hf_tokenizer


def single_token_fraction(tokenizer, strings):
    """The share of `strings` (e.g. legal moves with their leading space) that encode to exactly one token."""
    strings = list(strings)
    if not strings:
        return 0.0
    ids = tokenizer(strings, add_special_tokens=False)["input_ids"]
    return sum(len(x) == 1 for x in ids) / len(strings)
