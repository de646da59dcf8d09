"""Pruning at initialization: SNIP, GraSP, SynFlow, magnitude and random masks, then training.

See experiments/configs/prune_at_init.py for the command, machine, run time and expected result. Same flags as
experiments/run.py: --config, --workdir, --overwrite.
"""

from experiments import cli, run

if __name__ == "__main__":
  cli.main(run.run, "prune_at_init.py")
