"""Data and weights pruned in the same run (semi-batch data pruning inside IMP), against each alone.

See experiments/configs/data_and_weights.py for the command, machine, run time and expected result. Same flags as
experiments/run.py: --config, --workdir, --overwrite.
"""

from experiments import cli, run

if __name__ == "__main__":
  cli.main(run.run, "data_and_weights.py")
