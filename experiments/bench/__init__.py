"""The benchmarks: each script measures ratios in one process and prints (or appends) its figures.

``accel.py`` (every accelerator figure in one short run), ``scores.py``, ``masks.py``,
``precision.py``, ``input.py``, ``sweep.py``, ``dedup.py``, ``audit.py``, ``step_flops.py``,
``check_projection.py``, and ``hlo_profile.py`` (the HLO cost model ``accel.py`` reports). Run them
as ``python -m experiments.bench.<name>`` or by their old names, ``python -m
experiments.bench_<name>`` (``experiments.step_flops``, ...), which stay as aliases.
"""
