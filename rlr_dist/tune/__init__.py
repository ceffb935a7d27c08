"""`rlr-dist tune CONFIG --sweep SWEEP.yaml`: Ray Tune over dotted training-config keys (docs/tune.md).

space.py: the sweep file (search space, search, scheduler), validated before Ray starts; trial.py: the
trainables (local loop or the nested Ray pipeline); runner.py: the driver (Tuner, MLflow parent and nested
runs, progress lines); report.py: results table, reward-vs-divergence Pareto plot, best config.
"""
