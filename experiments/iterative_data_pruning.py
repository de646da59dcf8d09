"""Iterative data pruning: train, score, prune part of the remaining data, retrain; repeat.

See experiments/configs/iterative_data_pruning.py for the command, machine, run time and expected result. Same flags as
experiments/run.py: --config, --workdir, --overwrite.
"""

from experiments import cli, run

if __name__ == "__main__":
  cli.main(run.run, "iterative_data_pruning.py")
