"""Hugging Face GPT-2 checkpoints load into GPTClassifier exactly.

The reference is written here from the GPT-2 paper's equations and Hugging Face's tensor layout, in
NumPy float64 (PyTorch, which `transformers` needs, is not installed): it reads the checkpoint's
tensors by their Hugging Face names and never calls prunejax's model.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from prunejax import models
from prunejax.errors import ConfigError, DataError

TINY = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=61, n_positions=16,
            n_ctx=16, n_embd=32, n_layer=2, n_head=4, n_inner=None, layer_norm_epsilon=1e-5,
            activation_function="gelu_new", embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1,
            bos_token_id=60, eos_token_id=60)


def random_gpt2_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Every GPT2Model tensor by its Hugging Face name (Conv1D weights (in, out)), float32."""
  rng = np.random.default_rng(seed)
  d, m = cfg["n_embd"], cfg.get("n_inner") or 4 * cfg["n_embd"]
  w = lambda *shape: (0.3 * rng.standard_normal(shape) / math.sqrt(shape[0])).astype(np.float32)
  b = lambda n: (0.1 * rng.standard_normal(n)).astype(np.float32)
  t = {"wte.weight": (0.5 * rng.standard_normal((cfg["vocab_size"], d))).astype(np.float32),
       "wpe.weight": (0.3 * rng.standard_normal((cfg["n_positions"], d))).astype(np.float32)}
  for i in range(cfg["n_layer"]):
    for ln in ("ln_1", "ln_2"):
      t[f"h.{i}.{ln}.weight"] = (1 + b(d)).astype(np.float32)
      t[f"h.{i}.{ln}.bias"] = b(d)
    t[f"h.{i}.attn.c_attn.weight"], t[f"h.{i}.attn.c_attn.bias"] = 3 * w(d, 3 * d), b(3 * d)
    t[f"h.{i}.attn.c_proj.weight"], t[f"h.{i}.attn.c_proj.bias"] = w(d, d), b(d)
    t[f"h.{i}.mlp.c_fc.weight"], t[f"h.{i}.mlp.c_fc.bias"] = 3 * w(d, m), b(m)
    t[f"h.{i}.mlp.c_proj.weight"], t[f"h.{i}.mlp.c_proj.bias"] = w(m, d), b(d)
  t["ln_f.weight"], t["ln_f.bias"] = (1 + b(d)).astype(np.float32), b(d)
  return t


def write_checkpoint(path, cfg: dict, tensors: dict[str, np.ndarray], *, prefix: str = "",
                     buffers: bool = False) -> str:
  """Writes config.json and model.safetensors in the Hugging Face layout."""
  path.mkdir(parents=True, exist_ok=True)
  out = {prefix + k: v for k, v in tensors.items()}
  if buffers:  # what older GPT2LMHeadModel saves hold besides the weights
    p = cfg["n_positions"]
    for i in range(cfg["n_layer"]):
      out[f"{prefix}h.{i}.attn.bias"] = np.tril(np.ones((p, p), np.float32))[None, None]
      out[f"{prefix}h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    out["lm_head.weight"] = tensors["wte.weight"]
  save_file(out, str(path / "model.safetensors"))
  (path / "config.json").write_text(json.dumps(cfg))
  return str(path)


def write_tiny_gpt2_dir(path) -> str:
  """A complete tiny GPT-2 checkpoint directory: a byte-level BPE in GPT-2's file layout
  (vocab.json, merges.txt) and random TINY-shaped weights for its vocabulary."""
  from test_text import write_gpt2_format_files
  path.mkdir(parents=True, exist_ok=True)
  vocab, _ = write_gpt2_format_files(path)
  tiny = dict(TINY, vocab_size=len(vocab), bos_token_id=len(vocab) - 1,
              eos_token_id=len(vocab) - 1)
  return write_checkpoint(path, tiny, random_gpt2_tensors(tiny))


# ---- The reference: GPT-2 from the paper's equations on the Hugging Face tensors, float64. ----


def _layer_norm(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def reference_last_hidden(t: dict, cfg: dict, tokens: list[int]) -> np.ndarray:
  """GPT-2's final hidden state (after ln_f) at the last position of one unpadded sequence."""
  t = {k: np.asarray(v, np.float64) for k, v in t.items()}
  n, d, heads, eps = len(tokens), cfg["n_embd"], cfg["n_head"], cfg["layer_norm_epsilon"]
  hd = d // heads
  h = t["wte.weight"][tokens] + t["wpe.weight"][:n]
  causal = np.tril(np.ones((n, n), bool))
  for i in range(cfg["n_layer"]):
    p = f"h.{i}."
    a = _layer_norm(h, t[p + "ln_1.weight"], t[p + "ln_1.bias"], eps)
    qkv = a @ t[p + "attn.c_attn.weight"] + t[p + "attn.c_attn.bias"]
    q, k, v = (z.reshape(n, heads, hd).transpose(1, 0, 2) for z in np.split(qkv, 3, axis=-1))
    s = np.where(causal, q @ k.transpose(0, 2, 1) / math.sqrt(hd), -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    o = (s / s.sum(-1, keepdims=True)) @ v
    o = o.transpose(1, 0, 2).reshape(n, d)
    h = h + o @ t[p + "attn.c_proj.weight"] + t[p + "attn.c_proj.bias"]
    z = _layer_norm(h, t[p + "ln_2.weight"], t[p + "ln_2.bias"], eps)
    z = _gelu_tanh(z @ t[p + "mlp.c_fc.weight"] + t[p + "mlp.c_fc.bias"])
    h = h + z @ t[p + "mlp.c_proj.weight"] + t[p + "mlp.c_proj.bias"]
  return _layer_norm(h, t["ln_f.weight"], t["ln_f.bias"], eps)[-1]


def _padded_batch(rng, cfg, lengths, pad_id, context):
  seqs = [list(rng.integers(0, cfg["vocab_size"], n)) for n in lengths]
  tokens = np.full((len(seqs), context), pad_id, np.int32)
  for r, s in enumerate(seqs):
    tokens[r, : len(s)] = s
  return seqs, tokens


VARIANTS = {
    # GPT2LMHeadModel save: "transformer." prefix, mask buffers and a tied lm_head stored.
    "lm_head_model": (dict(), dict(prefix="transformer.", buffers=True), np.float32),
    # GPT2Model save: no prefix; n_inner, a large epsilon (its value matters) and float16 storage.
    "base_model_f16": (dict(architectures=["GPT2Model"], n_inner=48, layer_norm_epsilon=0.3,
                            activation_function="gelu_pytorch_tanh"), dict(), np.float16),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_reference_gpt2_with_padding(variant, tmp_path):
  overrides, layout, dtype = VARIANTS[variant]
  cfg = {**TINY, **overrides}
  tensors = {k: v.astype(dtype) for k, v in random_gpt2_tensors(cfg).items()}
  ckpt = write_checkpoint(tmp_path / "ckpt", cfg, tensors, **layout)
  model, params = models.load_gpt2_classifier(ckpt, 3, key=jax.random.key(0))
  assert (model.pad_id, model.vocab_size, model.context) == (61, 62, 16)
  assert (model.embd_dropout, model.attn_dropout, model.resid_dropout) == (0.1, 0.1, 0.1)
  seqs, tokens = _padded_batch(np.random.default_rng(1), cfg, [16, 1, 5, 9, 12, 3], 61, 16)
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens)))
  head_w = np.asarray(params["head"]["kernel"], np.float64)
  head_b = np.asarray(params["head"]["bias"], np.float64)
  ref = np.stack([reference_last_hidden(tensors, cfg, s) @ head_w + head_b for s in seqs])
  assert logits.shape == (6, 3) and np.abs(ref).max() > 0.1
  np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-5)
  if variant == "base_model_f16":  # the checkpoint's epsilon is used: GPT-2's default would differ
    wrong = {**cfg, "layer_norm_epsilon": 1e-5}
    ref_wrong = reference_last_hidden(tensors, wrong, seqs[0]) @ head_w + head_b
    assert np.abs(ref_wrong - ref[0]).max() > 1e-3


def test_params_have_the_structure_of_init_and_head_is_seeded(tmp_path):
  ckpt = write_checkpoint(tmp_path / "ckpt", TINY, random_gpt2_tensors(TINY))
  model, params = models.load_gpt2_classifier(ckpt, 5, key=jax.random.key(3), context=8,
                                              dropout=0.0)
  init = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  assert jax.tree.structure(params) == jax.tree.structure(init)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(
      lambda a: (a.shape, a.dtype), init)
  assert params["wpe"].shape == (8, 32) and (model.embd_dropout, model.attn_dropout) == (0.0, 0.0)
  np.testing.assert_array_equal(params["wte"]["embedding"][61], 0)  # the new pad row
  np.testing.assert_array_equal(params["block_1"]["attn"]["key"]["kernel"],
                                random_gpt2_tensors(TINY)["h.1.attn.c_attn.weight"][:, 32:64])
  _, again = models.load_gpt2_classifier(ckpt, 5, key=jax.random.key(3), context=8)
  _, other = models.load_gpt2_classifier(ckpt, 5, key=jax.random.key(4), context=8)
  np.testing.assert_array_equal(params["head"]["kernel"], again["head"]["kernel"])
  assert not np.array_equal(params["head"]["kernel"], other["head"]["kernel"])
  # eos as pad (Hugging Face's usual choice) keeps the vocabulary and masks that token.
  model_eos, params_eos = models.load_gpt2_classifier(ckpt, 5, key=jax.random.key(3), pad_id=60)
  assert model_eos.vocab_size == 61 and params_eos["wte"]["embedding"].shape == (61, 32)


# Hugging Face's published parameter counts (tied LM head) of the four GPT-2 checkpoints.
OFFICIAL = {
    "gpt2": (dict(n_embd=768, n_layer=12, n_head=12), 124_439_808),
    "gpt2-medium": (dict(n_embd=1024, n_layer=24, n_head=16), 354_823_168),
    "gpt2-large": (dict(n_embd=1280, n_layer=36, n_head=20), 774_030_080),
    "gpt2-xl": (dict(n_embd=1600, n_layer=48, n_head=25), 1_557_611_200),
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_gpt2_shapes(name):
  fields, count = OFFICIAL[name]
  config = models.gpt2_config_from_dict({**TINY, "vocab_size": 50257, "n_positions": 1024,
                                         **fields})
  assert sum(math.prod(s) for s in models.gpt2_tensor_shapes(config).values()) == count
  model = models.gpt2_classifier(config, 2)
  d = fields["n_embd"]
  # + the new pad row and the head (d * 2 + 2)
  assert models.param_count(model, jnp.zeros((1, 8), jnp.int32)) == count + d + 2 * d + 2


def _errors_case(tmp_path, case):
  cfg, tensors, layout = dict(TINY), random_gpt2_tensors(TINY), dict(prefix="transformer.")
  if case == "missing":
    del tensors["h.1.mlp.c_fc.weight"]
  elif case == "shape":
    tensors["h.0.attn.c_attn.weight"] = tensors["h.0.attn.c_attn.weight"].T.copy()
  elif case == "dtype":
    tensors["ln_f.bias"] = np.zeros(32, np.int32)
  elif case == "unexpected":  # weights of a 3-layer model under a 2-layer config
    tensors.update({k.replace("h.1.", "h.2."): v for k, v in tensors.items()
                    if k.startswith("h.1.")})
  elif case == "model_type":
    cfg["model_type"] = "gpt_neo"
  elif case == "architecture":
    cfg["architectures"] = ["GPTNeoForCausalLM"]
  elif case == "activation":
    cfg["activation_function"] = "relu"
  elif case == "field":
    del cfg["n_head"]
  elif case == "unscaled":
    cfg["scale_attn_weights"] = False
  return write_checkpoint(tmp_path / case, cfg, tensors, **layout)


ERRORS = {
    "missing": "has no tensor 'transformer.h.1.mlp.c_fc.weight'; expected shape \\(32, 128\\) "
               "\\(n_layer=2",
    "shape": "tensor 'transformer.h.0.attn.c_attn.weight' has shape \\(96, 32\\); expected "
             "\\(32, 96\\)",
    "dtype": "tensor 'transformer.ln_f.bias' has dtype I32; expected a floating-point dtype",
    "unexpected": "has unexpected tensor 'transformer.h.2.attn.c_attn.bias' with shape \\(96,\\)",
    "model_type": "model_type='gpt_neo' is not supported; expected 'gpt2'",
    "architecture": "architectures='GPTNeoForCausalLM' is not supported; expected one of GPT2Model",
    "activation": "activation_function='relu' is not supported; expected one of 'gelu_new'",
    "field": "n_head=None is not supported; expected a positive integer",
    "unscaled": "scale_attn_weights=False is not supported; expected True",
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_wrong_or_partial_checkpoint_is_one_line_error(case, tmp_path):
  ckpt = _errors_case(tmp_path, case)
  with pytest.raises(DataError, match=ERRORS[case]) as e:
    models.load_gpt2_classifier(ckpt, 2, key=jax.random.key(0))
  assert "\n" not in str(e.value)


def test_missing_files_and_bad_arguments_are_one_line_errors(tmp_path):
  with pytest.raises(DataError, match="does not exist; download one with: huggingface-cli"):
    models.load_gpt2_classifier(str(tmp_path / "nope"), 2, key=jax.random.key(0))
  with pytest.raises(DataError, match="has no config.json"):
    models.load_gpt2_classifier(str(tmp_path), 2, key=jax.random.key(0))
  (tmp_path / "config.json").write_text(json.dumps(TINY))
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(DataError, match="has no model.safetensors .*found pytorch_model.bin"):
    models.load_gpt2_classifier(str(tmp_path), 2, key=jax.random.key(0))
  (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(DataError, match="is not a readable safetensors file"):
    models.load_gpt2_classifier(str(tmp_path), 2, key=jax.random.key(0))
  ckpt = write_checkpoint(tmp_path / "ok", TINY, random_gpt2_tensors(TINY))
  for kwargs, message in [(dict(context=17), "context=17 is out of range; this GPT-2 checkpoint "
                                             "has n_positions=16"),
                          (dict(pad_id=62), "pad_id=62 is out of range; expected an integer in "
                                            "\\[0, 61\\]"),
                          (dict(dropout=1.0), "dropout=1.0 is out of range")]:
    with pytest.raises(ConfigError, match=message):
      models.load_gpt2_classifier(ckpt, 2, key=jax.random.key(0), **kwargs)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
  tensors = random_gpt2_tensors(TINY)
  single = write_checkpoint(tmp_path / "single", TINY, tensors)
  sharded = tmp_path / "sharded"
  sharded.mkdir()
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for file, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, str(sharded / file))
  (sharded / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
  (sharded / "config.json").write_text(json.dumps(TINY))
  _, p1 = models.load_gpt2_classifier(single, 2, key=jax.random.key(0))
  _, p2 = models.load_gpt2_classifier(str(sharded), 2, key=jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_fine_tuning_gradients_with_dropout_leave_the_pad_row_at_zero(tmp_path):
  ckpt = write_checkpoint(tmp_path / "ckpt", TINY, random_gpt2_tensors(TINY))
  model, params = models.load_gpt2_classifier(ckpt, 2, key=jax.random.key(0))
  _, tokens = _padded_batch(np.random.default_rng(2), TINY, [16, 4, 9, 2], 61, 16)
  y = jnp.array([0, 1, 1, 0])

  def loss(p, k):
    logits = model.apply({"params": p}, jnp.asarray(tokens), train=True, rngs={"dropout": k})
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y])

  g = jax.jit(jax.grad(loss))(params, jax.random.key(1))
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(g))
  emb_grad = np.asarray(g["wte"]["embedding"])
  np.testing.assert_array_equal(emb_grad[61], 0)  # padding never reaches a real position
  assert np.abs(emb_grad[:61]).max() > 0 and np.abs(np.asarray(g["head"]["kernel"])).max() > 0


def test_logits_match_transformers_gpt2(tmp_path):
  """Hugging Face's own GPT-2 (PyTorch, float64) as the reference where it is installed.

  `transformers` and PyTorch are not test dependencies (CI skips this); it was run on a machine that
  has them. The checkpoint is the one `save_pretrained` writes, "transformer." prefix included.
  """
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = transformers.GPT2Config(vocab_size=101, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                initializer_range=0.2, bos_token_id=100, eos_token_id=100)
  torch.manual_seed(0)
  hf = transformers.GPT2LMHeadModel(cfg).eval()
  with torch.no_grad():  # biases and LayerNorm parameters away from their init of 0 and 1
    for name, p in hf.named_parameters():
      if name.endswith("bias") or ".ln_" in name:
        p.add_(0.1 * torch.randn_like(p))
  hf.save_pretrained(str(tmp_path / "ckpt"))
  model, params = models.load_gpt2_classifier(str(tmp_path / "ckpt"), 3, key=jax.random.key(0))
  seqs, tokens = _padded_batch(np.random.default_rng(1), {"vocab_size": 101}, [16, 1, 5, 9, 12],
                               101, 16)
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens)))
  head_w = np.asarray(params["head"]["kernel"], np.float64)
  head_b = np.asarray(params["head"]["bias"], np.float64)
  base = hf.transformer.double()
  with torch.no_grad():
    ref = np.stack([base(torch.tensor([[int(t) for t in s]])).last_hidden_state[0, -1].numpy()
                    @ head_w + head_b for s in seqs])
  assert np.abs(ref).max() > 0.1
  np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-5)
