"""The config declarations (``experiments/configs/fields.py``): the defaults are the declarations,
every declared check refuses a bad value in one line naming the field, every choice a registry
offers is accepted, and every shipped config file (each ``:variant`` it accepts) validates."""

import ast
import glob
import importlib
import os

import ml_collections
import pytest

from experiments.configs import base, fields
from prunejax.errors import ConfigError

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs")
CHECKED = [f for f in fields.FIELDS if f.check is not None]


def _with(config: ml_collections.ConfigDict, path: str, value) -> ml_collections.ConfigDict:
  """``config`` with ``path`` set to ``value``, built by hand (as a user's own config may be, so
  that no type-safe assignment refuses the value first)."""
  d = config.to_dict()
  *sections, leaf = path.split(".")
  node = d
  for s in sections:
    node = node[s]
  node[leaf] = value
  return ml_collections.ConfigDict(d)


def _refused(config: ml_collections.ConfigDict) -> str:
  with pytest.raises(ConfigError) as e:
    fields.validate(config)
  message = str(e.value)
  assert message and "\n" not in message
  return message


def test_get_config_is_the_declared_defaults():
  flat = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict) and f"{prefix}{k}" not in {f.path for f in fields.FIELDS}:
        walk(v, f"{prefix}{k}.")
      else:
        flat[f"{prefix}{k}"] = v
  walk(base.get_config().to_dict(), "")
  assert sorted(flat) == sorted(f.path for f in fields.FIELDS)
  assert flat == {f.path: f.default for f in fields.FIELDS}
  fields.validate(base.get_config())


@pytest.mark.parametrize("field", CHECKED, ids=lambda f: f.path)
def test_a_value_the_declaration_refuses_names_the_field(field):
  bad = (field.check.bad,) if field.each else field.check.bad
  assert _refused(_with(base.get_config(), field.path, bad)).startswith(f"{field.path}=")


@pytest.mark.parametrize("field", fields.FIELDS, ids=lambda f: f.path)
def test_a_value_of_the_wrong_type_names_the_field(field):
  message = _refused(_with(base.get_config(), field.path, b"x"))
  assert message.startswith(f"{field.path}=b'x' is not allowed; expected ")


@pytest.mark.parametrize("field", [f for f in CHECKED if isinstance(f.check, fields.Choices)],
                         ids=lambda f: f.path)
def test_every_choice_of_the_registry_is_accepted(field):
  for option in field.check.options:
    try:
      fields.validate(_with(base.get_config(), field.path, (option,) if field.each else option))
    except ConfigError as e:  # a rule may ask for more (strategy 'less': a 'less' section)
      assert not str(e).startswith(f"{field.path}="), e


def test_an_undeclared_field_of_a_declared_section_is_refused():
  message = _refused(_with(base.get_config(), "train.lr_schedul", "step"))
  assert message.startswith("train.lr_schedul is not a config field; train has: epochs, ")
  # Open sections: a model's constructor arguments and a config file's own top-level fields.
  fields.validate(_with(_with(base.get_config(), "model.width_multiplier", 0.5),
                        "validation_fraction", 0.1))


def test_rules_across_fields_are_one_line():
  cfg = base.get_config()
  assert _refused(_with(cfg, "strategies", ())).startswith("strategies=() is empty")
  assert "must divide train.batch_size=32" in _refused(_with(cfg, "train.accumulation_steps", 3))
  assert _refused(_with(cfg, "imp.max_rounds", 1)).startswith("imp.max_rounds=1 cannot reach")
  assert _refused(_with(cfg, "dataset.name", "no_such_dataset")).startswith("dataset.name=")


def _variants(path: str) -> list:
  """The variants ``get_config`` of the file at ``path`` accepts: its default and every string it
  compares ``variant`` with."""
  found = set()
  for fn in ast.walk(ast.parse(open(path).read())):
    if isinstance(fn, ast.FunctionDef) and fn.name == "get_config":
      found.update(d.value for d in fn.args.defaults if isinstance(d, ast.Constant))
      for node in ast.walk(fn):
        if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name)
            and node.left.id == "variant"):
          found.update(n.value for c in node.comparators for n in ast.walk(c)
                       if isinstance(n, ast.Constant) and isinstance(n.value, str))
  return sorted(found) if found else [None]


SHIPPED = [(os.path.basename(p)[:-3], v)
           for p in sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py")))
           if os.path.basename(p) not in ("__init__.py", "fields.py") for v in _variants(p)]


@pytest.mark.parametrize("name,variant", SHIPPED, ids=[f"{n}:{v}" for n, v in SHIPPED])
def test_every_shipped_config_validates(name, variant, tmp_path):
  module = importlib.import_module(f"experiments.configs.{name}")
  cfg = module.get_config() if variant is None else module.get_config(variant)
  if cfg.model.get("require_checkpoint"):  # a pretrained checkpoint, named on the command line
    cfg.model.checkpoint_dir = str(tmp_path)
  fields.validate(cfg)
