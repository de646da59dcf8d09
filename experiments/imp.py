"""Iterative magnitude pruning with rewinding (lottery tickets) and its random controls.

See experiments/configs/imp.py for the command, machine, run time and expected result. Same flags as
experiments/run.py: --config, --workdir, --overwrite.
"""

from experiments import cli, run

if __name__ == "__main__":
  cli.main(run.run, "imp.py")
