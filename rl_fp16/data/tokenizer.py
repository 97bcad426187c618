"""A character-level tokenizer saved in Hugging Face format.

The tokenizer is a byte-level BPE with an empty merge list, so every character is one token. That
shape is deliberate: it is exactly what `transformers.Qwen2Tokenizer` rebuilds from the vocabulary
when `AutoTokenizer` loads a directory whose `config.json` says `model_type: qwen2` (transformers 5
ignores the saved `tokenizer_class` for that model type and reconstructs the tokenizer with a
byte-level pre-tokenizer and decoder). A plain `WordLevel` character vocabulary does not survive
that rebuild: spaces become `Ġ`, which is not in the vocabulary, and the BPE model silently drops
every symbol it cannot find, so text loses its spaces, and a vocabulary of multi-character words
encodes to an empty list. Storing the characters in their byte-level form (space as `Ġ`, newline
as `Ċ`) makes the file and every rebuild agree, for `AutoTokenizer` and for vLLM, which loads
through it.

Special tokens: `<pad>` = 0, `<bos>` = 1, `<eos>` = 2, `<unk>` = 3, then one id per alphabet
character. Hugging Face loaders add `<bos>` in front of encoded text (`add_special_tokens=True`);
`CharTokenizer.encode` adds it only when asked (`add_bos=True`).

Unknown characters: `CharTokenizer.encode` raises `ValueError` naming them. Hugging Face loaders
cannot raise; they drop such characters (the BPE has no unknown token, the same as the Qwen2
rebuild), so `<unk>` exists for loaders that insist on one but is never produced.
"""

from __future__ import annotations

import json
import os
import pathlib
import string
from collections.abc import Iterable

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from rl_fp16 import fileio

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

# Digits, lower-case letters, a little punctuation, space and newline: 50 characters, 54 ids.
DEFAULT_ALPHABET = string.digits + string.ascii_lowercase + " +-*/=:;,.()?\n"
MAX_VOCAB_SIZE = 64
DEFAULT_MODEL_MAX_LENGTH = 8192

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

# Same split as transformers' Qwen2Tokenizer, so a rebuilt tokenizer pre-tokenizes identically.
_QWEN2_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                      r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def _byte_level_symbol(char: str) -> str:
  """The byte-level (GPT-2) symbol of one ASCII character, e.g. ' ' -> 'Ġ'."""
  ((symbol, _),) = _BYTE_LEVEL.pre_tokenize_str(char)
  return symbol


def _check_alphabet(alphabet: str | Iterable[str]) -> str:
  chars = list(dict.fromkeys(alphabet))  # Dedupe, keep order.
  if not chars:
    raise ValueError("alphabet is empty; pass the characters the tokenizer must cover")
  bad = [c for c in chars if len(c) != 1 or ord(c) > 127]
  if bad:
    raise ValueError(f"alphabet entries {bad!r} are not single ASCII characters; only those are "
                     "allowed (one byte = one token)")
  size = len(SPECIAL_TOKENS) + len(chars)
  if size > MAX_VOCAB_SIZE:
    raise ValueError(f"alphabet of {len(chars)} characters gives vocab size {size}; at most "
                     f"{MAX_VOCAB_SIZE} is allowed")
  return "".join(chars)


def _build_backend(alphabet: str) -> tokenizers.Tokenizer:
  """The `tokenizers.Tokenizer` for a checked alphabet (see the module docstring)."""
  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
  for char in alphabet:
    vocab[_byte_level_symbol(char)] = len(vocab)
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None,
                                            continuing_subword_prefix="", end_of_word_suffix="",
                                            fuse_unk=False, byte_fallback=False))
  backend.normalizer = normalizers.NFC()
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(_QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                              for t in SPECIAL_TOKENS])
  bos_id = vocab[BOS_TOKEN]
  backend.post_processor = processors.TemplateProcessing(
      single=f"{BOS_TOKEN}:0 $A:0", pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
      special_tokens=[(BOS_TOKEN, bos_id)])
  return backend


class CharTokenizer:
  """Character-level tokenizer: one id per character, plus pad/bos/eos/unk.

  Wraps a `tokenizers.Tokenizer` (`backend`) built by `build_tokenizer` or read by `load_tokenizer`.
  """

  def __init__(self, backend: tokenizers.Tokenizer):
    vocab = backend.get_vocab(with_added_tokens=True)
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
      raise ValueError(f"tokenizer vocabulary lacks special tokens {missing}; required: "
                       f"{list(SPECIAL_TOKENS)}")
    self._backend = backend
    symbol_to_char = {_byte_level_symbol(chr(b)): chr(b) for b in range(128)}
    by_id = sorted((i, tok) for tok, i in vocab.items() if tok not in SPECIAL_TOKENS)
    unknown = [tok for _, tok in by_id if tok not in symbol_to_char]
    if unknown:
      raise ValueError(f"tokenizer vocabulary has entries {unknown!r} that are not single ASCII "
                       "characters in byte-level form; this is not a CharTokenizer vocabulary")
    self._alphabet = "".join(symbol_to_char[tok] for _, tok in by_id)
    self._alphabet_set = frozenset(self._alphabet)
    self._char_to_id = {symbol_to_char[tok]: i for i, tok in by_id}
    self.pad_id = vocab[PAD_TOKEN]
    self.bos_id = vocab[BOS_TOKEN]
    self.eos_id = vocab[EOS_TOKEN]
    self.unk_id = vocab[UNK_TOKEN]

  @property
  def backend(self) -> tokenizers.Tokenizer:
    """The underlying `tokenizers.Tokenizer`."""
    return self._backend

  @property
  def alphabet(self) -> str:
    """The covered characters, in id order."""
    return self._alphabet

  @property
  def vocab_size(self) -> int:
    """Number of ids (special tokens included); ids are 0 .. vocab_size - 1."""
    return self._backend.get_vocab_size(with_added_tokens=True)

  @property
  def special_ids(self) -> dict[str, int]:
    return {PAD_TOKEN: self.pad_id, BOS_TOKEN: self.bos_id, EOS_TOKEN: self.eos_id,
            UNK_TOKEN: self.unk_id}

  def unknown_chars(self, text: str) -> list[str]:
    """Characters of `text` outside the alphabet, sorted, without repeats."""
    return sorted(set(text) - self._alphabet_set)

  def _check_text(self, text: str) -> None:
    if not isinstance(text, str):
      raise TypeError(f"expected text as str, got {type(text).__name__}")
    bad = self.unknown_chars(text)
    if bad:
      raise ValueError(f"text has characters {bad!r} outside the tokenizer alphabet "
                       f"{self._alphabet!r}")

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of `text` (one per character); raises ValueError on unknown characters.

    `encode(text, add_bos=True)` equals Hugging Face `AutoTokenizer(...).encode(text)`, and
    `encode(text)` equals `.encode(text, add_special_tokens=False)`.
    """
    self._check_text(text)
    ids = [self.bos_id] if add_bos else []
    ids.extend(self._char_to_id[c] for c in text)
    if add_eos:
      ids.append(self.eos_id)
    return ids

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
    """Text of `ids` (int sequence or 1-D array); special tokens dropped unless asked."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"token ids {bad[:10]} are outside [0, {self.vocab_size})")
    return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

  def save(self, path: str | os.PathLike[str], *,
           model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> pathlib.Path:
    return save_tokenizer(path, self, model_max_length=model_max_length)


def build_tokenizer(alphabet: str | Iterable[str] = DEFAULT_ALPHABET) -> CharTokenizer:
  """A character tokenizer covering `alphabet` (ASCII; at most 60 distinct characters)."""
  return CharTokenizer(_build_backend(_check_alphabet(alphabet)))


def save_tokenizer(path: str | os.PathLike[str], tokenizer: CharTokenizer, *,
                   model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> pathlib.Path:
  """Writes `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json` into `path`.

  The directory loads with `transformers.AutoTokenizer.from_pretrained(path)` (with or without a
  model `config.json` beside it) and with vLLM. Returns the directory.
  """
  out = pathlib.Path(path)
  out.mkdir(parents=True, exist_ok=True)
  fileio.write_text_atomic(out / TOKENIZER_FILE, tokenizer.backend.to_str(pretty=True))
  special_map = {"pad_token": PAD_TOKEN, "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
                 "unk_token": UNK_TOKEN}
  added = {str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                    "single_word": False, "special": True}
           for tok, i in tokenizer.special_ids.items()}
  config = {
      # "PreTrainedTokenizerFast" is read by transformers 4 and 5 (5 maps it to TokenizersBackend).
      "tokenizer_class": "PreTrainedTokenizerFast",
      **special_map,
      "add_bos_token": True,
      "add_eos_token": False,
      "clean_up_tokenization_spaces": False,
      "model_max_length": model_max_length,
      "padding_side": "right",
      "added_tokens_decoder": added,
  }
  fileio.write_text_atomic(out / TOKENIZER_CONFIG_FILE, json.dumps(config, indent=2) + "\n")
  fileio.write_text_atomic(out / SPECIAL_TOKENS_MAP_FILE, json.dumps(special_map, indent=2) + "\n")
  return out


def load_tokenizer(path: str | os.PathLike[str]) -> CharTokenizer:
  """Reads a tokenizer written by `save_tokenizer` (a directory, or its `tokenizer.json`)."""
  p = pathlib.Path(path)
  file = p / TOKENIZER_FILE if p.is_dir() else p
  if not file.is_file():
    raise FileNotFoundError(f"no {TOKENIZER_FILE} at {p}; expected a directory written by "
                            "save_tokenizer or the file itself")
  return CharTokenizer(tokenizers.Tokenizer.from_file(str(file)))
