#!/bin/sh
# The real-GPU check: run on a machine with an NVIDIA GPU, from a copy of this repository, with no
# network. Needs python3 with prometheus-client and nvidia-ml-py; installs nothing. promtool comes from
# PATH or build/gpu-carry/; the C floor from build/gpu-carry/, or is compiled from bench/cref/cref.c
# where gcc is (prepare the folder with `make gpu-carry` and carry it).
#
#   tests/gpu/run.sh OUTDIR
#
# Writes summary.md, metrics.txt, nvidia-smi-q.xml, diagnose.json, results.json, exporter.log to
# OUTDIR (well under 8 files, for the device tool). Keep it under ~8 minutes.
set -eu
out=${1:?usage: tests/gpu/run.sh OUTDIR}
repo=$(cd "$(dirname "$0")/../.." && pwd)
shim=$(mktemp -d)
trap 'rm -rf "$shim"' EXIT
# The package's import name is nvml_exporter; its folder is exporter/ (pyproject maps it).
ln -s "$repo/exporter" "$shim/nvml_exporter"
command -v nvidia-smi >/dev/null || { echo "run.sh: nvidia-smi not found: no GPU driver here" >&2; exit 3; }
exec timeout 480 python3 "$repo/tests/gpu/check.py" "$out" "$shim"
