"""File names of a model folder (no torch here, so the dashboard can use them cheaply)."""

WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.json"
RESUME_FILE = "resume.pt"
#: written by the registry's training runs: version, run id and creation time when the run
#: starts, then kind, preset, data source, finish time
RUN_FILE = "run.json"
