"""GPT-2's tokenizer from vocab.json + merges.txt equals an independent implementation, tiktoken."""

import json
import random

import numpy as np
import pytest

from prunejax.data import text
from prunejax.errors import ConfigError, DataError

# GPT-2's pre-tokenizer regex, as published with GPT-2's encoder.py (and tiktoken's r50k/gpt2).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_WORDS = ("the movie is a quiet triumph of style over substance and it never quite finds its "
          "footing but the cast don't care they're having fun we'll see I've it's can't won't "
          "1999 2024 3.14 $42 100% #hashtag @user e-mail co-operate naïve café résumé façade "
          "Zürich São Paulo Ελληνικά русский текст 日本語のテキスト 中文文本 한국어 텍스트 "
          "עברית العربية हिन्दी ไทย emoji 😀 👍🏽 👨‍👩‍👧 🇫🇷 ∑ ∫ √ → ™ © ½ ﬁ").split()
_SPACES = [" ", " ", " ", "  ", "\t", "\n", "\n\n", " \n", "\u00a0", "\u3000", "\r\n", "   "]
_FIXED = ["", " ", "  ", "\n", "a", " a", "a ", "Hello, world!", "hello world", "It's", "IT'S",
          "don't stop", "we'll've", "'s", "'ll 'd 're", "   leading and trailing   ",
          "tabs\tand\nnewlines\r\n", "numbers 123456789 and 1,000,000.00", "!!!???...",
          "<|endoftext|>", "text <|endoftext|> more", "naïve café", "Ünïcödé", "ℌ𝔢𝔩𝔩𝔬",
          "😀😀😀", "👨‍👩‍👧‍👦 family", "🇺🇳", "日本語", "e\u0301", "\u200b\u200d", "\x00\x01\x7f",
          "ﬁ ligature", "Ω≈ç√∫˜µ≤≥÷", "a\u00a0b", "Ӂ ӂ", "​"]


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map (encoder.py, Radford et al. 2019)."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def _corpus(n: int, seed: int) -> list[str]:
  rng = random.Random(seed)
  out = list(_FIXED)
  while len(out) < n:
    k = rng.randint(1, 12)
    s = "".join(rng.choice(_WORDS) + rng.choice(_SPACES) for _ in range(k))
    if rng.random() < 0.3:
      s = s.upper() if rng.random() < 0.5 else s.strip()
    if rng.random() < 0.2:
      s += "".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(1, 4)))
    out.append(s)
  return out


def write_gpt2_format_files(d) -> tuple[dict[str, int], int]:
  """Trains a byte-level BPE and writes it to ``d`` in GPT-2's file layout; (vocab, merge count).

  GPT-2's vocab.json: ids 0-255 are the 256 bytes in GPT-2's byte order, then one id per merge in
  merge order, then <|endoftext|> last; merges.txt starts with a version line.
  """
  from tokenizers import ByteLevelBPETokenizer
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(_corpus(2000, seed=1), vocab_size=700, min_frequency=2,
                          show_progress=False)
  merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
            for m in json.loads(bpe._tokenizer.to_str())["model"]["merges"]]
  byte_order = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
  byte_order += [b for b in range(256) if b not in byte_order]
  b2u = _bytes_to_unicode()
  vocab = {b2u[b]: i for i, b in enumerate(byte_order)}
  for a, b in merges:
    vocab[a + b] = len(vocab)
  vocab[text.EOS] = len(vocab)
  (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                encoding="utf-8")
  return vocab, len(merges)


@pytest.fixture(scope="module")
def gpt2_format_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("gpt2_tok")
  vocab, num_merges = write_gpt2_format_files(d)
  return d, vocab, num_merges


def _tiktoken_encoding(d, eot, monkeypatch):
  import tiktoken
  from tiktoken.load import data_gym_to_mergeable_bpe_ranks
  monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken caches files by path, not content
  ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(d / "merges.txt"),
                                          encoder_json_file=str(d / "vocab.json"))
  return tiktoken.Encoding("test_gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                           special_tokens={text.EOS: eot})


def test_gpt2_tokenizer_matches_tiktoken_on_unicode_strings(gpt2_format_dir, monkeypatch):
  d, vocab, num_merges = gpt2_format_dir
  assert num_merges > 300  # the BPE learned real merges, so the comparison exercises merging
  tok = text.gpt2_tokenizer(str(d))
  enc = _tiktoken_encoding(d, vocab[text.EOS], monkeypatch)
  strings = _corpus(400, seed=2)  # different strings from the training corpus (seed 1)
  ours = tok.encode_batch(strings)
  ref = enc.encode_ordinary_batch(strings)
  mismatches = [(s, a, b) for s, a, b in zip(strings, ours, ref) if a != b]
  assert not mismatches, mismatches[:3]
  # The comparison is not trivial: most strings use merged tokens and multi-byte characters.
  assert sum(any(t >= 256 for t in ids) for ids in ours) > 300
  assert sum(any(ord(c) > 127 for c in s) for s in strings) > 200
  # Bytes round-trip: GPT-2's BPE is lossless.
  assert all(enc.decode(ids) == s for s, ids in zip(strings, ours))


def test_gpt2_tokenizer_eos_pad_and_encode(gpt2_format_dir):
  d, vocab, _ = gpt2_format_dir
  tok = text.get_tokenizer("gpt2", [], vocab_size=0, name="unused", tokenizer_dir=str(d))
  eot = vocab[text.EOS]
  assert (tok.name, tok.eos_id, tok.pad_id, tok.vocab_size) == ("gpt2", eot, eot + 1, eot + 2)
  # A literal "<|endoftext|>" in a text is ordinary text, never the control token.
  assert eot not in tok.encode_batch(["x <|endoftext|> y"])[0]
  out = text.encode(tok, ["Hello, world!", "a much longer text that will be truncated here"], 16)
  hello = tok.encode_batch(["Hello, world!"])[0]
  np.testing.assert_array_equal(out[0, : len(hello) + 1], hello + [eot])
  assert np.all(out[0, len(hello) + 1:] == tok.pad_id)
  assert len(hello) + 1 < 16 and len(tok.encode_batch(["a much longer text that will be "
                                                       "truncated here"])[0]) > 16
  assert out[1, -1] == eot and np.all(out[1] != tok.pad_id)


def test_gpt2_tokenizer_bad_input_is_one_line_error(gpt2_format_dir, tmp_path):
  d, _, _ = gpt2_format_dir
  with pytest.raises(ConfigError, match="tokenizer='gpt2' needs tokenizer_dir"):
    text.get_tokenizer("gpt2", [], vocab_size=0, name="x")
  with pytest.raises(ConfigError, match="tokenizer_dir=.* is only read by tokenizer='gpt2'"):
    text.get_tokenizer("bpe", ["a b"], vocab_size=300, name="x", tokenizer_dir=str(d))
  with pytest.raises(ConfigError, match="tokenizer='gpt3' is not allowed; choose one of: 'bpe', "
                     "'gpt2'"):
    text.get_tokenizer("gpt3", [], vocab_size=0, name="x")
  with pytest.raises(DataError, match="needs merges.txt in tokenizer_dir") as e:
    (tmp_path / "vocab.json").write_text((d / "vocab.json").read_text("utf-8"), "utf-8")
    text.gpt2_tokenizer(str(tmp_path))
  assert "\n" not in str(e.value)
  (tmp_path / "merges.txt").write_text("#version: 0.2\nx y\n", "utf-8")
  with pytest.raises(DataError, match="are malformed"):
    text.gpt2_tokenizer(str(tmp_path))
  vocab = json.loads((d / "vocab.json").read_text("utf-8"))
  del vocab[text.EOS]
  (tmp_path / "vocab.json").write_text(json.dumps(vocab), "utf-8")
  (tmp_path / "merges.txt").write_text((d / "merges.txt").read_text("utf-8"), "utf-8")
  with pytest.raises(DataError, match="has no '<\\|endoftext\\|>' token"):
    text.gpt2_tokenizer(str(tmp_path))


def test_gpt2_tokenizer_matches_transformers(gpt2_format_dir, monkeypatch):
  """Hugging Face's GPT-2 tokenizer as a second reference where `transformers` is installed.

  `transformers` is not a test dependency (CI skips this); it was run on a machine that has it.
  The one known difference: Hugging Face turns a literal "<|endoftext|>" inside a text into the
  control token, prunejax spells it out as ordinary text, so such strings are left out here.
  """
  transformers = pytest.importorskip("transformers")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  d, vocab, _ = gpt2_format_dir
  hf = transformers.GPT2TokenizerFast.from_pretrained(str(d))
  assert hf.eos_token_id == vocab[text.EOS] and len(hf) == len(vocab)
  tok = text.gpt2_tokenizer(str(d))
  strings = [s for s in _corpus(400, seed=2) if text.EOS not in s]
  ours = tok.encode_batch(strings)
  ref = [hf.encode(s, add_special_tokens=False) for s in strings]
  mismatches = [(s, a, b) for s, a, b in zip(strings, ours, ref) if a != b]
  assert len(strings) > 390 and not mismatches, mismatches[:3]
