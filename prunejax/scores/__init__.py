"""Data-importance scores: rank every training example (see the submodules)."""

from prunejax.scores.grand import (ghost_plan, grand, grand_jacrev, grand_last_layer, grand_vmap,
                                   penultimate)
from prunejax.scores.output import el2n, entropy, loss, margin
