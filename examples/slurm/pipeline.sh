#!/usr/bin/env bash
# The whole pipeline as dependent Slurm array jobs: teachers -> cache -> students -> evaluate.
#
#   bash examples/slurm/pipeline.sh examples/slurm/cluster.yaml
set -euo pipefail
CONFIG=${1:?usage: pipeline.sh CONFIG}
HERE=$(dirname "$0")
t=$(STAGE=teachers sbatch --parsable --array=0-2 "$HERE/array.sbatch" "$CONFIG")
c=$(STAGE=cache sbatch --parsable --dependency=afterok:$t "$HERE/array.sbatch" "$CONFIG")
s=$(STAGE=student sbatch --parsable --dependency=afterok:$c "$HERE/array.sbatch" "$CONFIG")
sbatch --dependency=afterok:$s --job-name=logitcache-eval --time=00:30:00 \
  --wrap "source .venv/bin/activate && logitcache evaluate $CONFIG"
