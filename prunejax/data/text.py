"""Text to fixed-length token ids with byte-level BPE tokenizers.

Three tokenizers (``TOKENIZERS``), all byte-level BPE (Radford et al. 2019):

- ``bpe`` (the offline default): trained locally on the training texts with HuggingFace
  ``tokenizers`` (no download) and cached as JSON, keyed by the dataset, the vocabulary size and a
  hash of the texts.
- ``gpt2``: GPT-2's own tokenizer, read from the ``vocab.json`` and ``merges.txt`` of a GPT-2
  checkpoint directory (``tokenizer_dir``) with ``tokenizers``, GPT-2's pre-tokenizer regex and no
  prefix space, as Hugging Face's ``GPT2TokenizerFast``; ``<|endoftext|>`` is the eos and the pad id
  is a new id after the vocabulary (see :func:`gpt2_tokenizer`). Use it with
  :func:`prunejax.models.load_gpt2_classifier` on the same directory.
- ``tiktoken_gpt2``: GPT-2's BPE via tiktoken where it is available (it needs its BPE file on disk
  or a network).

Each text becomes ``tokens + [eos]`` truncated (keeping the eos) or right-padded with ``pad_id`` to
``max_len``; the attention mask is ``tokens != pad_id``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Callable, Sequence

import numpy as np

from prunejax.errors import ConfigError, DataError, FileError, check_choice
from prunejax.fileio import atomic_write_text

log = logging.getLogger("prunejax")

PAD, EOS = "<|pad|>", "<|endoftext|>"
TOKENIZERS = ("bpe", "gpt2", "tiktoken_gpt2")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A tokenizer and the ids a model needs to agree with it.

  Attributes:
    name: one of :data:`TOKENIZERS`.
    encode_batch: ``encode_batch(texts) -> list[list[int]]``, text tokens only (no eos, no pad).
    vocab_size: every id the tokenizer may emit, pad included, lies in ``[0, vocab_size)``: the
      number of embedding rows a model for it needs. It means the same as
      :attr:`prunejax.models.GPTClassifier.vocab_size` and ``config.json``'s ``vocab_size`` (the
      rows of a checkpoint's table): GPT-2's tokenizer has 50257 with ``pad_id=50256`` (the
      end-of-text token) and 50258 with a new pad id 50257.
    pad_id: the padding id :func:`encode` fills with.
    eos_id: the end-of-text id :func:`encode` appends.
    decode_fn: ``decode_fn(ids) -> str``; use :meth:`decode`.
  """

  name: str
  encode_batch: Callable[[Sequence[str]], list[list[int]]]
  vocab_size: int
  pad_id: int
  eos_id: int
  decode_fn: Callable[[list[int]], str] | None = dataclasses.field(default=None, compare=False)

  def encode(self, text: str) -> list[int]:
    """One text's token ids (no eos, no pad); ``decode(encode(text)) == text``."""
    if not isinstance(text, str):
      raise DataError(f"Tokenizer.encode needs a str; got {type(text).__name__} (use "
                      "encode_batch for a list of texts)")
    return list(self.encode_batch([text])[0])

  def decode(self, ids: Sequence[int] | np.ndarray, *, skip_pad: bool = True) -> str:
    """The text of token ids; pad ids are dropped (``skip_pad``). When the pad is a real token
    (GPT-2's end-of-text), only the runs of it at either end are dropped, as padding.

    Raises:
      DataError: an id outside ``[0, vocab_size)`` (naming it and ``vocab_size``), ids that are
        not integers or not one sequence, or a tokenizer without a decoder.
    """
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
      raise DataError(f"Tokenizer.decode needs one sequence of integer ids; got shape {arr.shape} "
                      f"dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= self.vocab_size)
    if bad.any():
      raise DataError(f"Tokenizer.decode got token id {int(arr[bad][0])} outside [0, "
                      f"{self.vocab_size}), the tokenizer's vocab_size={self.vocab_size}")
    if self.decode_fn is None:
      raise DataError(f"tokenizer {self.name!r} has no decoder")
    if skip_pad:
      if self.pad_id == self.eos_id:  # padding on either side only: an eos inside is text
        real = np.flatnonzero(arr != self.pad_id)
        arr = arr[real[0]:real[-1] + 1] if real.size else arr[:0]
      else:
        arr = arr[arr != self.pad_id]
    return self.decode_fn([int(t) for t in arr])


def default_cache_dir() -> str:
  return os.environ.get("PRUNEJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "prunejax"))


def train_bpe(texts: Sequence[str], vocab_size: int, *, name: str = "data",
              cache_dir: str | None = None) -> Tokenizer:
  """Trains (or loads from cache) a byte-level BPE tokenizer on ``texts``."""
  from tokenizers import ByteLevelBPETokenizer
  if vocab_size < 258:
    raise ConfigError(f"vocab_size={vocab_size} is too small; byte-level BPE needs at least 258")
  digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()[:16]
  cache_dir = cache_dir or default_cache_dir()
  path = os.path.join(cache_dir, f"{name}_bpe{vocab_size}_{digest}.json")
  tok = _cached_bpe(path, vocab_size)
  if tok is None:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[PAD, EOS], show_progress=False)
    tok = bpe._tokenizer
    try:  # atomic: concurrent runs never read a half-written tokenizer.
      text = tok.to_str()
      atomic_write_text(path, text)
      atomic_write_text(path + ".sha256", _sha256(text) + "\n")
    except FileError as e:  # an unwritable cache costs a retraining next time, nothing else
      log.warning("tokenizer cache not written (%s); set PRUNEJAX_CACHE or dataset.cache_dir to a "
                  "writable directory to keep it", e)
  pad_id, eos_id = tok.token_to_id(PAD), tok.token_to_id(EOS)
  from tokenizers import decoders
  tok.decoder = decoders.ByteLevel()
  return Tokenizer("bpe", lambda b: [e.ids for e in tok.encode_batch(list(b))],
                   tok.get_vocab_size(), pad_id, eos_id,
                   lambda ids: tok.decode(ids, skip_special_tokens=False))


def _cached_bpe(path: str, vocab_size: int):
  """The tokenizer cached at ``path``, or None when there is none or it is unusable (truncated,
  damaged: its checksum ``path.sha256`` differs, unreadable, without the special tokens): it is
  then retrained and the cache rewritten."""
  from tokenizers import Tokenizer as HFTokenizer
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    with open(path + ".sha256", encoding="utf-8") as f:
      expected = f.read().strip()
    if _sha256(text) != expected:
      raise ValueError("the file fails its checksum")
    tok = HFTokenizer.from_str(text)
  except Exception as e:  # noqa: BLE001 - OSError, UnicodeDecodeError, tokenizers' own Exception.
    log.warning("the cached tokenizer %s is unusable (%s: %s); retraining it", path,
                type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
    return None
  if tok.token_to_id(PAD) is None or tok.token_to_id(EOS) is None or \
      tok.get_vocab_size() > vocab_size:
    log.warning("the cached tokenizer %s is not a prunejax BPE of %d tokens; retraining it", path,
                vocab_size)
    return None
  return tok


def _sha256(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


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
                   enc.n_vocab, eos, lambda ids: enc.decode([t for t in ids if t != enc.n_vocab]))


def gpt2_tokenizer(tokenizer_dir: str, *, pad_id: int | None = None) -> Tokenizer:
  """GPT-2's byte-level BPE from ``tokenizer_dir/vocab.json`` and ``tokenizer_dir/merges.txt``.

  The HuggingFace ``tokenizers`` BPE model with GPT-2's byte-level pre-tokenizer (GPT-2's regex, no
  prefix space) and no normalizer, as ``GPT2TokenizerFast``. Texts are encoded as ordinary text: a
  literal ``<|endoftext|>`` inside a text is spelled out in pieces, never turned into the control
  token (tiktoken's ``encode_ordinary``).

  The eos is ``<|endoftext|>`` (50256 for GPT-2). GPT-2 has no pad token. By default ``pad_id`` is
  a new id one past the largest id of ``vocab.json`` (50257) and ``vocab_size`` counts it (50258):
  :func:`prunejax.models.load_gpt2_classifier` gives that id a zero embedding row. The pad is then
  never a real token, so the classifier, which masks ``tokens != pad_id`` and reads the last real
  position, reads the eos that :func:`encode` appends, as GPT-1's fine-tuning reads its extract
  token. With ``pad_id=eos_id`` (Hugging Face's usual choice) ``vocab_size`` is 50257 and the last
  real position is the last text token, as ``GPT2ForSequenceClassification`` reads it. Pass the
  tokenizer to :func:`prunejax.models.load_gpt2_classifier` (``tokenizer=``) so that the model
  takes the same pad and eos.

  Args:
    tokenizer_dir: a GPT-2 checkpoint directory (or any directory with GPT-2-format ``vocab.json``
      and ``merges.txt`` whose vocabulary holds ``<|endoftext|>``).
    pad_id: None (a new id after the vocabulary) or the end-of-text id.

  Returns:
    The tokenizer; ``encode_batch(texts) -> list[list[int]]``.

  Raises:
    DataError: a file is missing or malformed, or the vocabulary has no ``<|endoftext|>``.
  """
  import json

  from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
  vocab_path, merges_path = (os.path.join(tokenizer_dir, n) for n in ("vocab.json", "merges.txt"))
  for path in (vocab_path, merges_path):
    if not os.path.exists(path):
      raise DataError(f"tokenizer='gpt2' needs {os.path.basename(path)} in tokenizer_dir="
                      f"{tokenizer_dir!r}; expected a GPT-2 checkpoint directory (vocab.json, "
                      "merges.txt), e.g. from huggingface-cli download openai-community/gpt2")
  try:
    with open(vocab_path, encoding="utf-8") as f:
      vocab = json.load(f)
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
      raise ValueError("expected an object of token -> integer id")
    bpe = models.BPE.from_file(vocab_path, merges_path)
  except Exception as e:  # noqa: BLE001 - json and tokenizers raise several types.
    raise DataError(f"GPT-2 tokenizer files in {tokenizer_dir!r} are malformed "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
  if EOS not in vocab:
    raise DataError(f"{vocab_path} has no {EOS!r} token; expected GPT-2's vocabulary")
  tok = HFTokenizer(bpe)
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  new_pad = max(vocab.values()) + 1
  if pad_id is not None and pad_id not in (new_pad, vocab[EOS]):
    raise ConfigError(f"pad_id={pad_id!r} is not allowed for tokenizer='gpt2'; expected None or "
                      f"{new_pad} (a new pad id) or {vocab[EOS]} (<|endoftext|>)")
  pad_id = new_pad if pad_id is None else pad_id
  encode_batch = lambda b: [e.ids for e in tok.encode_batch(list(b), add_special_tokens=False)]
  return Tokenizer("gpt2", encode_batch, max(pad_id, new_pad - 1) + 1, pad_id, vocab[EOS],
                   lambda ids: tok.decode(ids, skip_special_tokens=False))


def get_tokenizer(kind: str, train_texts: Sequence[str], *, vocab_size: int, name: str,
                  cache_dir: str | None = None, tokenizer_dir: str | None = None) -> Tokenizer:
  """The tokenizer ``kind`` (one of ``TOKENIZERS``).

  Args:
    kind: ``"bpe"`` (trained on ``train_texts`` with ``vocab_size`` tokens, cached under
      ``cache_dir`` as ``name``), ``"gpt2"`` (read from ``tokenizer_dir``) or ``"tiktoken_gpt2"``.
    train_texts: the training texts (used by ``"bpe"`` only).
    vocab_size: the vocabulary size of ``"bpe"``; the other two have GPT-2's.
    name: the cache name of ``"bpe"``.
    cache_dir: the cache directory of ``"bpe"`` (default :func:`default_cache_dir`).
    tokenizer_dir: a GPT-2 checkpoint directory with ``vocab.json`` and ``merges.txt``, required by
      ``"gpt2"`` and refused by the others.

  Raises:
    ConfigError: an unknown ``kind``, or ``tokenizer_dir`` missing for ``"gpt2"`` / given otherwise.
  """
  check_choice("tokenizer", kind, TOKENIZERS)
  if kind == "gpt2":
    if not tokenizer_dir:
      raise ConfigError("tokenizer='gpt2' needs tokenizer_dir, a GPT-2 checkpoint directory with "
                        "vocab.json and merges.txt")
    return gpt2_tokenizer(tokenizer_dir)
  if tokenizer_dir is not None:
    raise ConfigError(f"tokenizer_dir={tokenizer_dir!r} is only read by tokenizer='gpt2', not "
                      f"tokenizer={kind!r}; drop it or choose tokenizer='gpt2'")
  if kind == "bpe":
    return train_bpe(train_texts, vocab_size, name=name, cache_dir=cache_dir)
  return tiktoken_gpt2()


def encode(tok: Tokenizer, texts: Sequence[str], max_len: int, *, padding_side: str = "right",
           return_mask: bool = False) -> np.ndarray | dict[str, np.ndarray]:
  """Token ids ``i32[N, max_len]``: text tokens then eos, truncated keeping the eos, padded.

  Args:
    tok: the tokenizer.
    texts: the texts.
    max_len: the length of every row (at least 2).
    padding_side: ``"right"`` (default) or ``"left"``.
    return_mask: return ``{"input_ids": i32[N, max_len], "attention_mask": bool[N, max_len]}``
      (what a Hugging Face tokenizer returns; the GPT takes it as its input) instead of the ids.
      The mask is True at the text tokens and the eos, also when the pad id is the eos.
  """
  if max_len < 2:
    raise ConfigError(f"max_len={max_len} is too small; expected at least 2")
  check_choice("padding_side", padding_side, ("right", "left"))
  out = np.full((len(texts), max_len), tok.pad_id, np.int32)
  mask = np.zeros((len(texts), max_len), bool)
  for i, ids in enumerate(tok.encode_batch(texts)):
    ids = [t for t in ids if t != tok.pad_id][: max_len - 1] + [tok.eos_id]
    sl = slice(0, len(ids)) if padding_side == "right" else slice(max_len - len(ids), max_len)
    out[i, sl], mask[i, sl] = ids, True
  return {"input_ids": out, "attention_mask": mask} if return_mask else out


def attention_mask(tokens: np.ndarray, pad_id: int) -> np.ndarray:
  """``tokens != pad_id``: the attention mask of ids padded with a pad that is never a text token
  (when the pad is the eos, the appended eos is masked too; use ``encode(return_mask=True)``)."""
  return tokens != pad_id
