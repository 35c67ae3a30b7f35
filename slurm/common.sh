# common.sh - sourced by train.sbatch and train_srun.sbatch after they have set REPO.
# Sets up the job's environment, prints a header (with one `hostname` per task) and fills
# the array TRAIN_CMD: the per-rank command line (python examples/train_digits.py ...).
# Settings are environment variables; see README.md in this directory.

: "${SLURM_JOB_ID:?run this through sbatch (or inside an salloc allocation)}"

METHOD=${METHOD:-signum}
EPOCHS=${EPOCHS:-8}
SCRIPT_ARGS=${SCRIPT_ARGS:-}
# The virtual environment must be visible at the same path on every node: put it on the
# shared file system (home or project space), not on node-local /tmp.
VENV=${VENV:-$REPO/.venv}
PYTHON=${PYTHON:-$VENV/bin/python}
RUN_DIR=${RUN_DIR:-$REPO/runs}
PROGRESS=${PROGRESS:-0}
SHOW_HOSTS=${SHOW_HOSTS:-1}

if [ ! -x "$PYTHON" ]; then
  echo "error: no Python at $PYTHON; set VENV=/shared/path/to/venv (or PYTHON=...)" >&2
  exit 2
fi
# The training script in examples/ (train_torchrun.sbatch sets train_digits_ddp.py).
TRAIN_SCRIPT=${TRAIN_SCRIPT:-train_digits.py}
if [ ! -f "$REPO/examples/$TRAIN_SCRIPT" ]; then
  echo "error: $REPO/examples/$TRAIN_SCRIPT not found; set REPO=/shared/path/to/hvd_signsgd" >&2
  exit 2
fi

export VIRTUAL_ENV=$VENV
export PATH="$VENV/bin:$PATH"
# Import hvd_signsgd from the checkout even where it is not pip-installed into the venv.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# One BLAS/OpenMP thread per CPU Slurm gave the task; more only oversubscribes the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# Rank 0's RESULT line should reach the log as it is printed, not when the buffer fills.
export PYTHONUNBUFFERED=1

# Open MPI's mpirun refuses to run as root unless told so twice. Only containers and test
# VMs run jobs as root (e.g. slurm/local_cluster.sh); a normal user never gets these.
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

mkdir -p "$RUN_DIR"
read -r -a _extra <<< "$SCRIPT_ARGS"
TRAIN_CMD=("$PYTHON" "$REPO/examples/$TRAIN_SCRIPT" --method "$METHOD" --epochs "$EPOCHS"
           --out "$RUN_DIR/train_digits-$METHOD-job$SLURM_JOB_ID.json")
# Progress (four lines per epoch in a batch log) is off unless asked for (PROGRESS=1). The
# RESULT line and the JSON in RUN_DIR carry the numbers.
[ "$PROGRESS" = 1 ] || TRAIN_CMD+=(--no-progress)
TRAIN_CMD+=("${_extra[@]}")

echo "== job $SLURM_JOB_ID ($SLURM_JOB_NAME): nodes=$SLURM_JOB_NUM_NODES [$SLURM_JOB_NODELIST]" \
     "tasks=${SLURM_NTASKS:-?} method=$METHOD epochs=$EPOCHS"
echo "== repo $REPO, python $PYTHON, started $(date -Is) on $(hostname)"
if [ "$SHOW_HOSTS" = 1 ]; then
  # One line per task, "RANK: HOSTNAME": shows where the ranks will land. --mpi=none: a
  # plain program needs no PMI server.
  echo "== hosts:"
  srun --mpi=none --label hostname | sort -n
fi
echo "== run: ${TRAIN_CMD[*]}"
