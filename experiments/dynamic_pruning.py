"""Dynamic data pruning in one run: random subsets, batch pruning and semi-batch (InfoBatch).

See experiments/configs/dynamic_pruning.py for the command, machine, run time and expected result. Same flags as
experiments/run.py: --config, --workdir, --overwrite.
"""

from experiments import cli, run

if __name__ == "__main__":
  cli.main(run.run, "dynamic_pruning.py")
