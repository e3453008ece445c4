#!/usr/bin/env bash
# Run jaxalign on the GPUs of this host (one process sees all of them), or as one process of a
# multi-node job. See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/gpu.sh --config FILE [--set KEY=VALUE]... [--job train|pipeline] [--resume] [--restarts N]
                     [--gpus 0,1,...] [--mem-fraction F] [--log FILE]
                     [--nodes N --node-rank R --coordinator HOST:PORT] [--dry-run]

One host: a single process drives every local GPU (or those in --gpus); the config's mesh spans them.
Several hosts (one process per host, all GPUs of each):
  explicit: run on every node, the same --nodes and --coordinator (node 0's address and a free port),
            each its own --node-rank:
              launch/gpu.sh --config C --nodes 2 --node-rank 0 --coordinator node0:8476   # on node0
              launch/gpu.sh --config C --nodes 2 --node-rank 1 --coordinator node0:8476   # on node1
  SLURM:    srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu.sh --config C
            (jaxalign reads SLURM_* itself: coordinator = first node of the step, one task per node
            sees all its GPUs; one task per GPU works too)

Environment set here (a value you export yourself wins):
  XLA_FLAGS                       --xla_gpu_enable_latency_hiding_scheduler=true, then your own XLA_FLAGS
  XLA_PYTHON_CLIENT_MEM_FRACTION  0.9 (or --mem-fraction)
  PYTHON                          the interpreter (default: .venv/bin/python of this project, else python3)

Options:
  --job train|pipeline   the jaxalign command (default train)
  --resume               continue the run in output_dir
  --restarts N           when the job exits 75 (stopped early by a signal that reached it, not this
                         script: resumable), start it again with --resume, up to N times (default 0)
  --gpus LIST            CUDA_VISIBLE_DEVICES for this process
  --log FILE             also write the output to FILE (tee)
  --dry-run              print the environment and the command instead of running it
  -h, --help             this help

Exit status: the job's: 0 finished, 75 stopped early and resumable (run again with --resume; under
SLURM, e.g. `scontrol requeue $SLURM_JOB_ID`), 2 a bad config or usage, 1 an unexpected error.
A SIGTERM or SIGINT sent to this script is passed on to the job, which checkpoints and exits 75.
EOF
}

die() { echo "launch/gpu.sh: error: $*" >&2; echo "run launch/gpu.sh --help for usage" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }

CONFIG="" JOB="train" GPUS="" MEM_FRACTION="" LOG="" NODES="" NODE_RANK="" COORDINATOR="" DRY=0 RESUME=0 RESTARTS=0
SETS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --set) need_value "$@"; [[ "$2" == *=* ]] || die "--set expects KEY=VALUE, got '$2'"; SETS+=("$2"); shift 2 ;;
    --job) need_value "$@"; JOB="$2"; shift 2 ;;
    --resume) RESUME=1; shift ;;
    --restarts) need_value "$@"; RESTARTS="$2"; shift 2 ;;
    --gpus) need_value "$@"; GPUS="$2"; shift 2 ;;
    --mem-fraction) need_value "$@"; MEM_FRACTION="$2"; shift 2 ;;
    --log) need_value "$@"; LOG="$2"; shift 2 ;;
    --nodes) need_value "$@"; NODES="$2"; shift 2 ;;
    --node-rank) need_value "$@"; NODE_RANK="$2"; shift 2 ;;
    --coordinator) need_value "$@"; COORDINATOR="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
done

[[ -n "$CONFIG" ]] || die "--config is required"
[[ "$JOB" == train || "$JOB" == pipeline ]] || die "--job must be train or pipeline, got '$JOB'"
[[ "$RESTARTS" =~ ^[0-9]+$ ]] || die "--restarts must be a non-negative integer, got '$RESTARTS'"
[[ -z "$GPUS" || "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus must be a list of GPU numbers like 0,1,2,3, got '$GPUS'"
[[ -z "$MEM_FRACTION" || "$MEM_FRACTION" =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || die "--mem-fraction must be in (0, 1], got '$MEM_FRACTION'"
if [[ -n "$NODES$NODE_RANK$COORDINATOR" ]]; then
  [[ -n "$NODES" && -n "$NODE_RANK" && -n "$COORDINATOR" ]] || die "multi-node needs all of --nodes, --node-rank and --coordinator"
  [[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
  [[ "$NODE_RANK" =~ ^[0-9]+$ ]] && (( NODE_RANK < NODES )) || die "--node-rank must be in 0..$((NODES - 1)), got '$NODE_RANK'"
  [[ "$COORDINATOR" =~ ^[^:[:space:]]+:[0-9]+$ ]] || die "--coordinator must be HOST:PORT, got '$COORDINATOR'"
fi
if [[ ! -f "$CONFIG" ]] && (( DRY == 0 )); then die "config file not found: $CONFIG"; fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

# XLA flags for GPUs, as the JAX GPU performance tips and NVIDIA's JAX-Toolbox recommend:
#   --xla_gpu_enable_latency_hiding_scheduler=true  schedule collectives (FSDP all-gathers and
#       reduce-scatters) to overlap with compute; the one flag NVIDIA's JAX containers set.
# Not set, to try per workload (see https://docs.jax.dev/en/latest/gpu_performance_tips.html and
# NVIDIA JAX-Toolbox "GPU performance"): --xla_gpu_triton_gemm_any=true (Triton for every GEMM),
# CUDA_DEVICE_MAX_CONNECTIONS=1 (strict stream ordering; NVIDIA advises against it on Blackwell),
# NCCL_NVLS_ENABLE=1 (NVLink SHARP all-reduce on H100; needs extra memory).
DEFAULT_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_FLAGS="$DEFAULT_XLA_FLAGS${XLA_FLAGS:+ $XLA_FLAGS}"
# JAX preallocates this share of each GPU's memory (default 0.75); 0.9 leaves room for CUDA/NCCL.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${MEM_FRACTION:-${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}}"
EXPORTS=(XLA_FLAGS XLA_PYTHON_CLIENT_MEM_FRACTION)
if [[ -n "$GPUS" ]]; then export CUDA_VISIBLE_DEVICES="$GPUS"; EXPORTS+=(CUDA_VISIBLE_DEVICES); fi
if [[ -n "$NODES" ]]; then
  # Read by jaxalign.runtime.distributed: every process joins the same job before touching a GPU.
  export JAXALIGN_COORDINATOR="$COORDINATOR" JAXALIGN_NUM_PROCESSES="$NODES" JAXALIGN_PROCESS_ID="$NODE_RANK"
  EXPORTS+=(JAXALIGN_COORDINATOR JAXALIGN_NUM_PROCESSES JAXALIGN_PROCESS_ID)
fi

CMD=("$PYTHON" -m jaxalign.cli "$JOB" --config "$CONFIG")
for s in "${SETS[@]}"; do CMD+=(--set "$s"); done
(( RESUME )) && CMD+=(--resume)

if (( DRY )); then
  for name in "${EXPORTS[@]}"; do printf 'export %s=%q\n' "$name" "${!name}"; done
  printf '%q ' "${CMD[@]}" | sed 's/ $//'; echo
  [[ -n "$LOG" ]] && echo "(output also written to $LOG)"
  exit 0
fi
if [[ -n "$LOG" ]]; then mkdir -p "$(dirname "$LOG")"; fi
(( RESTARTS == 0 )) && [[ -z "$LOG" ]] && exec "${CMD[@]}"

# Run the job as a child: a signal to this script goes on to it (and then no restart follows).
SIGNALLED=0 PENDING="" INTERRUPTED=0 CHILD=""
forward() {
  SIGNALLED=1 INTERRUPTED=1
  if [[ -n "$CHILD" ]]; then kill "-$1" "$CHILD" 2>/dev/null || true; else PENDING="$1"; fi
}
trap 'forward TERM' TERM
trap 'forward INT' INT
attempt=0
while :; do
  if [[ -n "$LOG" ]]; then
    "${CMD[@]}" > >(tee -a "$LOG") 2>&1 &
  else
    "${CMD[@]}" &
  fi
  CHILD=$!
  if [[ -n "$PENDING" ]]; then kill "-$PENDING" "$CHILD" 2>/dev/null || true; PENDING=""; fi
  # A trapped signal ends `wait` early (status 128+n): wait again for the job's own exit status
  # (127 then means the previous wait had it already).
  code=""
  while :; do
    INTERRUPTED=0 status=0
    wait "$CHILD" || status=$?
    [[ -n "$code" && $status == 127 ]] && break
    code=$status
    (( INTERRUPTED )) || break
  done
  if (( code == 75 && SIGNALLED == 0 && attempt < RESTARTS )); then
    attempt=$((attempt + 1))
    echo "launch/gpu.sh: the job stopped early (exit 75); restart $attempt of $RESTARTS with --resume" >&2
    [[ " ${CMD[*]} " == *" --resume "* ]] || CMD+=(--resume)
    continue
  fi
  exit "$code"
done
