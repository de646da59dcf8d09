"""Text to fixed-length token ids with a GPT-2-style byte-level BPE tokenizer.

The tokenizer is trained locally on the training texts with HuggingFace ``tokenizers`` (no download) and
cached as JSON, keyed by the dataset, the vocabulary size and a hash of the training texts. tiktoken's
``gpt2`` encoding is an option where it is available (it needs its BPE file on disk or a network).
Each text becomes ``tokens + [eos]`` truncated (keeping the eos) or right-padded with ``pad_id`` to
``max_len``; the attention mask is ``tokens != pad_id``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Callable, Sequence

import numpy as np

from prunejax.errors import ConfigError, DataError, check_choice
from prunejax.fileio import atomic_write_text

PAD, EOS = "<|pad|>", "<|endoftext|>"
TOKENIZERS = ("bpe", "tiktoken_gpt2")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  name: str
  encode_batch: Callable[[Sequence[str]], list[list[int]]]
  vocab_size: int
  pad_id: int
  eos_id: int


def default_cache_dir() -> str:
  return os.environ.get("PRUNEJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "prunejax"))


def train_bpe(texts: Sequence[str], vocab_size: int, *, name: str = "data",
              cache_dir: str | None = None) -> Tokenizer:
  """Trains (or loads from cache) a byte-level BPE tokenizer on ``texts``."""
  from tokenizers import ByteLevelBPETokenizer, Tokenizer as HFTokenizer
  if vocab_size < 258:
    raise ConfigError(f"vocab_size={vocab_size} is too small; byte-level BPE needs at least 258")
  digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()[:16]
  cache_dir = cache_dir or default_cache_dir()
  path = os.path.join(cache_dir, f"{name}_bpe{vocab_size}_{digest}.json")
  if os.path.exists(path):
    tok = HFTokenizer.from_file(path)
  else:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[PAD, EOS], show_progress=False)
    tok = bpe._tokenizer
    # atomic: concurrent runs never read a half-written tokenizer.
    atomic_write_text(path, tok.to_str())
  pad_id, eos_id = tok.token_to_id(PAD), tok.token_to_id(EOS)
  return Tokenizer("bpe", lambda b: [e.ids for e in tok.encode_batch(list(b))],
                   tok.get_vocab_size(), pad_id, eos_id)


def tiktoken_gpt2() -> Tokenizer:
  """GPT-2's own BPE via tiktoken; pad is a new id after the vocabulary."""
  try:
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
  except Exception as e:  # noqa: BLE001
    raise DataError(f"tokenizer='tiktoken_gpt2' is not available here ({type(e).__name__}); install "
                    "tiktoken and make its gpt2 file available, or use tokenizer='bpe'") from None
  eos = enc.eot_token
  return Tokenizer("tiktoken_gpt2", lambda b: enc.encode_ordinary_batch(list(b)), enc.n_vocab + 1,
                   enc.n_vocab, eos)


def get_tokenizer(kind: str, train_texts: Sequence[str], *, vocab_size: int, name: str,
                  cache_dir: str | None = None) -> Tokenizer:
  check_choice("tokenizer", kind, TOKENIZERS)
  if kind == "bpe":
    return train_bpe(train_texts, vocab_size, name=name, cache_dir=cache_dir)
  return tiktoken_gpt2()


def encode(tok: Tokenizer, texts: Sequence[str], max_len: int) -> np.ndarray:
  """Token ids i32[N, max_len]: text tokens then eos, truncated keeping the eos, right-padded."""
  if max_len < 2:
    raise ConfigError(f"max_len={max_len} is too small; expected at least 2")
  out = np.full((len(texts), max_len), tok.pad_id, np.int32)
  for i, ids in enumerate(tok.encode_batch(texts)):
    ids = [t for t in ids if t != tok.pad_id][: max_len - 1] + [tok.eos_id]
    out[i, : len(ids)] = ids
  return out


def attention_mask(tokens: np.ndarray, pad_id: int) -> np.ndarray:
  return tokens != pad_id
