"""Static data pruning (Data Diet): score, keep a fraction, retrain; every score against random.

See experiments/configs/static_pruning.py for the command, machine, run time and expected result. Same flags as
experiments/run.py: --config, --workdir, --overwrite.
"""

from experiments import cli, run

if __name__ == "__main__":
  cli.main(run.run, "static_pruning.py")
