# Sourced by train.sbatch / train_multinode.sbatch; not run directly.
# One launch/run.py (accelerate launch + the run's outcome as exit code) per node through srun: rendezvous
# on the job's first host, a port derived from the job id, each node's machine rank evaluated on that node.
#
# How a stop reaches the trainer (every path ends in a checkpoint and exit 75, tested on a real cluster):
#   - the batch shell's warning signal (`--signal=B:USR1@SECS`, or `scancel --signal=USR1 --batch`): this
#     script writes a STOP file on the shared file system; the trainer agrees a step on all ranks,
#     checkpoints and exits 75; then this script requeues the job, which resumes by itself;
#   - a signal to every process of the job (`scancel --signal=USR1 JOBID`, `--signal=USR1@SECS` without B:):
#     each node's run.py tells its ranks; exit 75 and requeue as above;
#   - SIGTERM to every process (`scontrol requeue`, preemption, `scancel`, a time limit without a warning
#     signal): the same checkpoint and exit 75 within SLURM's KillWait; SLURM itself requeues (or, for a
#     plain scancel, ends) the job: this script does not requeue it a second time.
#
# The job's exit code says how the run ended: 0 done, 75 stopped after a checkpoint, 76 a rank was lost (a
# node died or could not be reached within train.dist_timeout_s; requeued to resume), 2 user error (one line
# in the log says what), 3 diverged (NaN guard), 1 crash.
#
# Nodes without GPUs (a CPU partition): GPUS_PER_NODE sets the processes per node (gloo), and the job's
# requests are overridden on the command line, not edited:
#   GPUS_PER_NODE=2 sbatch --gpus-per-node=0 --cpus-per-task=4 launch/slurm/train.sbatch CONFIG
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
CONFIG=${1:?usage: sbatch launch/slurm/train.sbatch CONFIG [--set key=value ...]}
shift
PY=${PYTHON:-python}
NNODES=${SLURM_NNODES:-1}
GPUS=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$("$PY" -c 'import torch; print(max(1, torch.cuda.device_count()))')}}
[ "$GPUS" -ge 1 ] 2>/dev/null || GPUS=1
NPROC=$((NNODES * GPUS))
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=$((20000 + SLURM_JOB_ID % 20000))
# This shell runs on the head node: a port that another program holds there would take the rendezvous (the
# other nodes would wait on a stranger's server); take a free one instead, and say so.
if [ "$HEAD" = "$(hostname -s)" ] && ! "$PY" -c 'import socket, sys; socket.socket().bind(("", int(sys.argv[1])))' "$PORT" 2>/dev/null; then
    FREE=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
    echo "dcgan_dist: port $PORT on $HEAD is in use by another program; the rendezvous uses port $FREE"
    PORT=$FREE
fi
export DCGAN_DIST_STOP_FILE="$PWD/.dcgan-stop-$SLURM_JOB_ID"
export DCGAN_DIST_JOB_OUTCOME="$PWD/.dcgan-outcome-$SLURM_JOB_ID"     # the first node's outcome (run.py)
rm -f "$DCGAN_DIST_STOP_FILE" "$DCGAN_DIST_JOB_OUTCOME"
MULTI=()
[ "$NPROC" -gt 1 ] && MULTI=(--multi_gpu)

ENDING=0        # SLURM is ending the job itself (SIGTERM): it requeues it, or it was cancelled
on_signal() {
    echo "dcgan_dist: $1 received: asking the trainer to checkpoint and stop"
    [ "$1" = TERM ] && ENDING=1
    touch "$DCGAN_DIST_STOP_FILE"
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

echo "dcgan_dist: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x $GPUS, head $HEAD:$PORT"
# The script given to bash -c is in single quotes: $SLURM_NODEID is evaluated by each node's task
# (accelerate#2816), and every other argument reaches run.py as one word, untouched by any shell.
ARGS=("${MULTI[@]}" --num_machines "$NNODES" --num_processes "$NPROC" --main_process_ip "$HEAD"
      --main_process_port "$PORT" --rdzv_backend static --mixed_precision no --dynamo_backend no
      launch/train.py --config "$CONFIG" "$@")
srun --kill-on-bad-exit=1 --ntasks-per-node=1 --nodes="$NNODES" \
    bash -c 'exec "$0" launch/run.py --machine_rank "$SLURM_NODEID" "$@"' "$PY" "${ARGS[@]}" &
pid=$!
# A node that is gone with its SLURM step daemon leaves srun waiting for it: 60 s after the first node
# recorded why the run ended, the step is over, whatever srun still waits for.
( while kill -0 "$pid" 2>/dev/null; do
      if [ -f "$DCGAN_DIST_JOB_OUTCOME" ]; then
          sleep 60
          kill -0 "$pid" 2>/dev/null && echo "dcgan_dist: a node's job step did not end 60 s after the run ended; ending srun" \
              && kill -9 "$pid"
          break
      fi
      sleep 2
  done ) &
# `wait` returns early when a trapped signal arrives; keep waiting until the job step has really ended.
wait "$pid"
rc=$?
while kill -0 "$pid" 2>/dev/null; do
    wait "$pid"
    rc=$?
done
rm -f "$DCGAN_DIST_STOP_FILE"
# srun's code is the worst of the nodes' (128+9 for a node whose processes were killed): the first node to know
# why the run ended (a rank lost, 76) says it in the outcome file
if [ -f "$DCGAN_DIST_JOB_OUTCOME" ]; then
    rc=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["exit_code"])' "$DCGAN_DIST_JOB_OUTCOME" 2>/dev/null || echo "$rc")
    rm -f "$DCGAN_DIST_JOB_OUTCOME"
fi
if [ "$rc" = 76 ] && [ "$ENDING" = 0 ]; then
    echo "dcgan_dist: a rank was lost (see the error above); requeueing job $SLURM_JOB_ID to resume from the newest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
elif [ "$rc" = 75 ] && [ "$ENDING" = 0 ]; then
    echo "dcgan_dist: checkpointed after a stop request; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
elif [ "$rc" = 75 ]; then
    echo "dcgan_dist: checkpointed after SIGTERM; SLURM decides whether job $SLURM_JOB_ID is requeued"
fi
exit "$rc"
