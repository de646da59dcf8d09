"""Where the model-pruning names live, and that their old homes re-export the very same objects.

``prunejax.masks.posttraining`` was split into files by what they do (``pt_layers``,
``calibration``, ``pt_driver``, ``wanda``, ``sparsegpt``); the filters and mesh helpers left
``masks.core``, the layout helpers left ``masks.structured``, the walk left ``layer_taps`` and the
masked optimizer state left ``optim``. Every name stays importable where it was: a re-export that
broke, or a name defined twice, fails here. No module of ``prunejax.masks`` imports
``prunejax.optim`` (the optimizer imports the masks, never the reverse).
"""

import ast
import importlib
import inspect
import pathlib

import pytest

import prunejax

# old home -> {name: the module that defines it now}
HOMES = {
    "prunejax.masks.posttraining": {
        **dict.fromkeys(["MAX_STATS_BYTES", "Calibration", "LayerStats", "calibrate",
                         "calibration_nbytes", "_batch_stats", "_check_batch", "_dense_stats"],
                        "prunejax.masks.calibration"),
        **dict.fromkeys(["ORDERS", "LinearLayer", "default_block_fn", "linear_filter_fn",
                         "linear_layers", "sequential_passes", "_analyse", "_stage_frames"],
                        "prunejax.masks.pt_layers"),
        **dict.fromkeys(["SCOPES", "_rule"], "prunejax.masks.pt_driver"),
        **dict.fromkeys(["wanda", "wanda_scores", "wanda_scores_frame"], "prunejax.masks.wanda"),
        **dict.fromkeys(["obs_prune", "sparsegpt", "sparsegpt_scores", "_block_counts"],
                        "prunejax.masks.sparsegpt"),
        **dict.fromkeys(["layer_errors", "reconstruction_error"], "prunejax.masks.posttraining"),
    },
    "prunejax.masks.core": {
        **dict.fromkeys(["EMBEDDING_MODULE", "EMBEDDING_NAME", "POSITION_NAME", "PRUNABLE_NAMES",
                         "WEIGHT_NAME", "default_filter_fn", "leaf_paths", "make_filter_fn",
                         "nothing_selected_error", "path_names", "path_str", "prunable_leaves",
                         "resolve_filter"], "prunejax.masks.filters"),
        **dict.fromkeys(["check_not_varying", "explicit_sharding", "has_explicit_axes",
                         "reshard_like", "run_sharded", "varying_axes"], "prunejax.masks.sharding"),
        **dict.fromkeys(["apply_mask", "check_mask", "count_params", "num_to_prune", "ones_mask",
                         "ordered_key", "sparsity_of", "threshold_mask", "threshold_mask_flags",
                         "_SORT_MAX"], "prunejax.masks.core"),
    },
    "prunejax.masks.structured": {
        **dict.fromkeys(["LAYOUTS", "IN_OUT_NAMES", "OUT_IN_NAMES", "BIAS_NAMES", "Layout",
                         "leaf_layout", "structured_filter_fn"], "prunejax.masks.layouts"),
        **dict.fromkeys(["ATTENTION_NAMES", "CRITERIA", "SCOPES", "channels", "heads", "n_m",
                         "neurons", "_n_m_filter_fn"], "prunejax.masks.structured"),
    },
    "prunejax.layer_taps": {
        **dict.fromkeys(["Layer", "LayerPlan", "Site", "_Walker", "_X"], "prunejax.layer_walk"),
        **dict.fromkeys(["batch_size", "broadcast_to_batch", "find_layers", "layer_weights",
                         "penultimate", "per_example", "run", "site_values"],
                        "prunejax.layer_taps"),
    },
    "prunejax.optim": {
        **dict.fromkeys(["MaskedState", "get_mask", "set_mask"], "prunejax.masks.masked_state"),
        **dict.fromkeys(["masked", "MaskFn"], "prunejax.optim"),
    },
}

CASES = [(old, name, new) for old, names in HOMES.items() for name, new in names.items()]


@pytest.mark.parametrize("old,name,new", CASES, ids=[f"{o}.{n}" for o, n, _ in CASES])
def test_old_home_reexports_the_object_of_its_new_home(old, name, new):
  obj = getattr(importlib.import_module(old), name)
  assert obj is getattr(importlib.import_module(new), name)
  fn = getattr(obj, "__wrapped__", obj)  # jax.jit keeps the function it wraps
  if (inspect.isfunction(fn) or inspect.isclass(fn)) and not name.endswith("filter_fn"):
    assert fn.__module__ == new, (name, fn.__module__)  # filters are made by make_filter_fn


def test_posttraining_all_is_complete_and_defined():
  pt = importlib.import_module("prunejax.masks.posttraining")
  public = {n for n in HOMES["prunejax.masks.posttraining"] if not n.startswith("_")}
  assert set(pt.__all__) == public
  for name in pt.__all__:
    assert getattr(pt, name) is not None


def test_masks_package_names_are_those_of_the_modules_that_define_them():
  masks = importlib.import_module("prunejax.masks")
  for old, names in HOMES.items():
    if not old.startswith("prunejax.masks"):
      continue
    for name, new in names.items():
      if hasattr(masks, name) and not name.startswith("_"):
        assert getattr(masks, name) is getattr(importlib.import_module(new), name), name


def _imports(path: pathlib.Path) -> set[str]:
  """Every module a file imports, at module level or inside a function."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


def test_masks_never_import_the_optimizer():
  root = pathlib.Path(prunejax.__file__).parent / "masks"
  for path in sorted(root.glob("*.py")):
    bad = {m for m in _imports(path) if m == "prunejax.optim" or m.startswith("prunejax.optim.")}
    assert not bad, f"{path.name} imports {sorted(bad)}"
