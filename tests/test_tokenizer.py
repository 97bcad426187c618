"""Character tokenizer: ids, round trips, and loading through transformers' AutoTokenizer."""

import json

import pytest

from deps import require
from tokenizers import decoders
from transformers import AutoTokenizer

from rl_fp16.data import synthetic
from rl_fp16.data import tokenizer as tok_lib

TEXTS = [
    "q: 3+5+2+8+1\n3+5=8; 8+2=10; 10+8=18; 18+1=19\na: 19",
    "  leading and trailing spaces  ",
    "punctuation , . ? ( ) / * - : ; =",
    "\n\nnewlines\n",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
  return tok_lib.build_tokenizer()


@pytest.fixture(scope="module")
def saved_dir(tokenizer, tmp_path_factory):
  return tokenizer.save(tmp_path_factory.mktemp("tok"))


def test_vocab_layout(tokenizer):
  assert tokenizer.vocab_size == len(tok_lib.DEFAULT_ALPHABET) + 4 <= 64
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
  assert tokenizer.alphabet == tok_lib.DEFAULT_ALPHABET
  ids = tokenizer.encode(tokenizer.alphabet)
  assert ids == list(range(4, tokenizer.vocab_size))
  small = tok_lib.build_tokenizer(synthetic.ALPHABET)
  assert small.vocab_size == len(set(synthetic.ALPHABET)) + 4


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_backend_agree(tokenizer, text):
  ids = tokenizer.encode(text)
  assert len(ids) == len(text)
  assert tokenizer.backend.encode(text, add_special_tokens=False).ids == ids
  assert tokenizer.decode(ids) == text
  full = tokenizer.encode(text, add_bos=True, add_eos=True)
  assert full == [tokenizer.bos_id, *ids, tokenizer.eos_id]
  assert tokenizer.decode(full) == text
  assert tokenizer.decode(full, skip_special_tokens=False) == f"<bos>{text}<eos>"


def test_unknown_characters_raise(tokenizer):
  with pytest.raises(ValueError, match=r"\['A', 'é'\] outside the tokenizer alphabet"):
    tokenizer.encode("Aé1")
  assert tokenizer.unknown_chars("Q1") == ["Q"]
  with pytest.raises(ValueError, match="outside"):
    tokenizer.decode([0, 99])
  with pytest.raises(ValueError, match="not single ASCII"):
    tok_lib.build_tokenizer("abé")
  with pytest.raises(ValueError, match="at most 64"):
    tok_lib.build_tokenizer([chr(c) for c in range(33, 127)])


def test_save_and_load(tokenizer, saved_dir):
  assert {p.name for p in saved_dir.iterdir()} == {
      "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
  config = json.loads((saved_dir / "tokenizer_config.json").read_text())
  assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
  loaded = tok_lib.load_tokenizer(saved_dir)
  assert loaded.alphabet == tokenizer.alphabet
  assert loaded.special_ids == tokenizer.special_ids
  assert loaded.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    tok_lib.load_tokenizer(saved_dir / "missing")


# A model directory saved beside the tokenizer changes how AutoTokenizer loads it: for qwen2,
# transformers 5 ignores tokenizer_class and rebuilds a byte-level BPE from the vocabulary.
@pytest.mark.parametrize("model_type", [None, "qwen2", "qwen3", "llama"])
def test_auto_tokenizer_agrees(tokenizer, tmp_path, model_type):
  tokenizer.save(tmp_path)
  if model_type:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
  hf = AutoTokenizer.from_pretrained(str(tmp_path))
  assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
  assert len(hf) == hf.vocab_size == tokenizer.vocab_size
  for text in TEXTS:
    ids = tokenizer.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.encode(text) == tokenizer.encode(text, add_bos=True)
    assert hf(text)["input_ids"] == tokenizer.encode(text, add_bos=True)
    full = tokenizer.encode(text, add_bos=True, add_eos=True)
    assert hf.decode(full, skip_special_tokens=True) == text
    assert hf.decode(ids) == text
  assert hf.convert_ids_to_tokens(tokenizer.encode("a b")) == ["a", "Ġ", "b"]


def test_incremental_detokenization(tokenizer, saved_dir):
  """vLLM decodes streamed tokens with tokenizers' DecodeStream; pieces must join to the text."""
  hf = AutoTokenizer.from_pretrained(str(saved_dir))
  stream = decoders.DecodeStream(skip_special_tokens=True)
  text = TEXTS[0]
  pieces = [stream.step(hf._tokenizer, i) for i in tokenizer.encode(text, add_eos=True)]
  assert "".join(p for p in pieces if p) == text


@pytest.mark.vllm
def test_vllm_tokenizer_loader(tokenizer, saved_dir):
  hf_mod = require("vllm.tokenizers.hf")
  vtok = hf_mod.CachedHfTokenizer.from_pretrained(str(saved_dir))
  assert vtok.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0], add_bos=True)
  assert vtok.decode(tokenizer.encode(TEXTS[0], add_eos=True), skip_special_tokens=True) == TEXTS[0]
  assert vtok.eos_token_id == tokenizer.eos_id
  assert vtok.max_token_id == tokenizer.vocab_size - 1
