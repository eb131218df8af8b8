#!/usr/bin/env bash
# Set up, lint, then run the test suite. Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# Lint (rules pinned in pyproject.toml, ruff pinned in its dev extra): a lint error fails the run, as a test does.
ruff check .
# DeepSpeed compiles its CPU shared-memory collectives the first time a process on a CPU uses them (~30 s on two
# cores, again whenever the venv moves). Build them here, once, not inside whichever scale-out test runs first.
python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" > /dev/null 2>&1 \
    || echo "note: DeepSpeed's CPU shared-memory op did not build here; the first scale-out test will try again"
# Two workers, each taking whole test files (so a file's fixtures are built once): most of a test's time is a
# subprocess importing torch and diffusers on one core. One torch thread per process: two workers whose torch
# each spins two threads on two cores run the compute-heavy tests several times slower. -n 0: one process.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python -m pytest -n 2 --dist loadfile "$@"
