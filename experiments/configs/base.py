"""Defaults shared by every experiment config; each config file starts from ``base.get_config()``.

Every field, its default, type and allowed values are declared once in
``experiments/configs/fields.py`` (:data:`~experiments.configs.fields.FIELDS`, with what each means);
:func:`experiments.configs.fields.validate` checks a config against the same declarations.
"""

import ml_collections

from experiments.configs import fields


def get_config() -> ml_collections.ConfigDict:
  return fields.defaults()
