#!/usr/bin/env bash
# Run jaxalign on a Cloud TPU slice: create it, copy this project to every worker, install, start the
# same training command on all workers at once, and watch / stop / delete it. See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu.sh --name NAME --zone ZONE [--project PROJECT] ACTION... [--dry-run]

Actions (create and run may be combined; the others run alone):
  --create --accelerator TYPE --version RUNTIME [--spot | --queued [--spot]]
        create the slice, e.g. --accelerator v5p-64 --version v2-alpha-tpuv5
        (v5e: v5litepod-8 / v2-alpha-tpuv5-lite; v6e: v6e-256 / v2-alpha-tpuv6e).
        --spot: a Spot (preemptible) slice. --queued: ask through a queued resource
        (gcloud compute tpus queued-resources create) and wait until it is ACTIVE.
  --config FILE [--set KEY=VALUE]... [--job train|pipeline] [--resume] [--no-install]
        copy the project to every worker (a tarball of the git-tracked and untracked,
        not ignored files), pip install -e '.[tpu]' into REMOTE_DIR/.venv, and start
        `jaxalign JOB --config FILE --set ...` on all workers at once under nohup:
        one log per worker, REMOTE_DIR/logs/worker-$TPU_WORKER_ID.log
  --status              state of the slice, and whether each worker's job runs (+ its last log lines)
  --logs [--worker K] [--follow]
                        the log of worker K (default 0)
  --stop                SIGTERM the job on every worker (it stops at a step boundary)
  --delete [--queued]   delete the slice (with --queued: the queued resource and its slice)

Options:
  --remote-dir DIR      where the project lives on the workers (default: jaxalign, in the home dir)
  --dry-run             print every command instead of running it
  -h, --help            this help

Data, checkpoints and run dirs: paths in the config are read on every worker and passed through
untouched; gs:// URLs work for all of them but data.cache_dir (see launch/README.md).

Preemption (Spot slices): the workers get SIGTERM; the job finishes its step, writes a checkpoint
to output_dir and exits 75 ("stopped early, resumable"; --logs shows "preempted: stopped after
step N"). Once the slice is back (--delete, then --create it again; a queued resource asks again),
start the same job with --resume: `train` continues from the newest checkpoint, and `pipeline`
skips its finished stages and resumes the unfinished one. Keep output_dir on gs:// so it outlives
the slice.
EOF
}

die() { echo "launch/tpu.sh: error: $*" >&2; echo "run launch/tpu.sh --help for usage" >&2; exit 2; }

NAME="" ZONE="" PROJECT="" ACCELERATOR="" VERSION="" CONFIG="" JOB="train" REMOTE_DIR="jaxalign" WORKER=""
CREATE=0 SPOT=0 QUEUED=0 STATUS=0 LOGS=0 FOLLOW=0 STOP=0 DELETE=0 DRY=0 RESUME=0 INSTALL=1
SETS=()

need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --create) CREATE=1; shift ;;
    --accelerator) need_value "$@"; ACCELERATOR="$2"; shift 2 ;;
    --version) need_value "$@"; VERSION="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --set) need_value "$@"; [[ "$2" == *=* ]] || die "--set expects KEY=VALUE, got '$2'"; SETS+=("$2"); shift 2 ;;
    --job) need_value "$@"; JOB="$2"; shift 2 ;;
    --resume) RESUME=1; shift ;;
    --no-install) INSTALL=0; shift ;;
    --remote-dir) need_value "$@"; REMOTE_DIR="$2"; shift 2 ;;
    --status) STATUS=1; shift ;;
    --logs) LOGS=1; shift ;;
    --worker) need_value "$@"; WORKER="$2"; shift 2 ;;
    --follow) FOLLOW=1; shift ;;
    --stop) STOP=1; shift ;;
    --delete) DELETE=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
done

[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
RUN=0; [[ -n "$CONFIG" ]] && RUN=1
(( CREATE + RUN + STATUS + LOGS + STOP + DELETE > 0 )) || die "nothing to do: give --create, --config, --status, --logs, --stop or --delete"
(( STATUS + LOGS + STOP + DELETE <= 1 )) || die "--status, --logs, --stop and --delete each run alone"
(( STATUS + LOGS + STOP + DELETE == 0 || CREATE + RUN == 0 )) || die "--status, --logs, --stop and --delete run alone, not with --create or --config"
if (( CREATE )); then
  [[ -n "$ACCELERATOR" ]] || die "--create needs --accelerator (e.g. v5p-64)"
  [[ -n "$VERSION" ]] || die "--create needs --version (the TPU runtime, e.g. v2-alpha-tpuv5)"
else
  [[ -z "$ACCELERATOR$VERSION" ]] || die "--accelerator and --version go with --create"
  (( SPOT == 0 )) || die "--spot goes with --create"
  (( QUEUED == 0 || DELETE || STATUS )) || die "--queued goes with --create, --delete or --status"
fi
(( RUN || ${#SETS[@]} == 0 )) || die "--set goes with --config"
(( RUN || (RESUME == 0 && INSTALL == 1) )) || die "--resume and --no-install go with --config"
[[ "$JOB" == train || "$JOB" == pipeline ]] || die "--job must be train or pipeline, got '$JOB'"
[[ -z "$WORKER" || "$WORKER" =~ ^[0-9]+$ ]] || die "--worker must be a worker number, got '$WORKER'"
if (( LOGS == 0 )) && [[ $FOLLOW == 1 || -n "$WORKER" ]]; then die "--worker and --follow go with --logs"; fi
[[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_./-]+$ ]] || die "--remote-dir must be a plain path, got '$REMOTE_DIR'"
if (( RUN )) && [[ ! -f "$CONFIG" ]] && (( DRY == 0 )); then die "config file not found: $CONFIG"; fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if (( RUN )); then  # the config travels with the project: name it relative to the project root
  abs=$(realpath -m "$CONFIG")
  [[ "$abs" == "$ROOT"/* ]] || die "the config must be inside the project ($ROOT), which is what is copied to the workers: $CONFIG"
  CONFIG="${abs#"$ROOT"/}"
fi

# ---------------------------------------------------------------------------------------------------

# A command as one line a shell reads back the same (single quotes only where needed).
show() {
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_@%+=:,./~-]+$ ]]; then out+="$arg "; else out+="'${arg//\'/\'\\\'\'}' "; fi
  done
  echo "${out% }"
}
run() { if (( DRY )); then show "$@"; else "$@"; fi; }
q() { printf '%q' "$1"; }

GCLOUD_FLAGS=("--zone=$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_FLAGS+=("--project=$PROJECT")
ssh_all() { run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$1"; }
# The worker's number in the slice: $TPU_WORKER_ID where the runtime sets it, else the metadata server.
WORKER_ID='ID=${TPU_WORKER_ID:-$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)}'

create() {
  if (( QUEUED )); then
    local extra=(); (( SPOT )) && extra+=(--spot)
    run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${GCLOUD_FLAGS[@]}" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION" "${extra[@]}"
    if (( DRY )); then
      show gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_FLAGS[@]}" '--format=value(state.state)'
    else
      echo "waiting for queued resource $NAME to become ACTIVE ..." >&2
      local state=""
      while [[ "$state" != ACTIVE ]]; do
        state=$(gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_FLAGS[@]}" '--format=value(state.state)')
        case "$state" in FAILED|SUSPENDED) die "queued resource $NAME is $state" ;; esac
        [[ "$state" == ACTIVE ]] || sleep 30
      done
    fi
  else
    local extra=(); (( SPOT )) && extra+=(--spot)
    run gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}" --accelerator-type="$ACCELERATOR" \
      --version="$VERSION" "${extra[@]}"
  fi
}

sync_project() {
  local root="$ROOT" tarball
  tarball="${TMPDIR:-/tmp}/jaxalign-$NAME.tgz"
  if (( DRY )); then
    echo "(cd $(q "$root") && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf $(q "$tarball"))"
  else
    (cd "$root" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$tarball")
  fi
  run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:jaxalign-src.tgz" "${GCLOUD_FLAGS[@]}" --worker=all
  ssh_all "mkdir -p $REMOTE_DIR && tar -xzf jaxalign-src.tgz -C $REMOTE_DIR && rm jaxalign-src.tgz"
}

install() {
  ssh_all "cd $REMOTE_DIR && { test -d .venv || python3 -m venv .venv; } && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e '.[tpu]'"
}

start() {
  local cmd=".venv/bin/jaxalign $JOB --config $(q "$CONFIG")" s
  for s in "${SETS[@]}"; do cmd+=" --set $(q "$s")"; done
  (( RESUME )) && cmd+=" --resume"
  # Every worker runs the same command; jax.distributed finds the others through the TPU metadata.
  ssh_all "cd $REMOTE_DIR && mkdir -p logs && $WORKER_ID && { nohup $cmd > logs/worker-\$ID.log 2>&1 < /dev/null & echo \$! > logs/worker-\$ID.pid; }"
}

status() {
  if (( QUEUED )); then
    run gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_FLAGS[@]}" '--format=value(state.state)'
  fi
  run gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_FLAGS[@]}" '--format=value(state,acceleratorType,health)'
  ssh_all "cd $REMOTE_DIR && $WORKER_ID && if kill -0 \$(cat logs/worker-\$ID.pid 2>/dev/null) 2>/dev/null; then echo \"worker \$ID: running\"; else echo \"worker \$ID: not running\"; fi; tail -n 3 logs/worker-\$ID.log 2>/dev/null || true"
}

logs() {
  local k="${WORKER:-0}" follow=""
  (( FOLLOW )) && follow=" -f"
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker="$k" \
    --command="tail -n 200$follow $REMOTE_DIR/logs/worker-$k.log"
}

stop() {
  ssh_all "cd $REMOTE_DIR && $WORKER_ID && if test -f logs/worker-\$ID.pid; then kill -TERM \$(cat logs/worker-\$ID.pid) 2>/dev/null && echo \"worker \$ID: sent SIGTERM\" || echo \"worker \$ID: not running\"; fi"
}

delete() {
  if (( QUEUED )); then
    run gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_FLAGS[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
  fi
}

(( DRY )) || command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI"
(( CREATE )) && create
if (( RUN )); then
  sync_project
  (( INSTALL )) && install
  start
  (( DRY )) || echo "started on every worker of $NAME; follow with: launch/tpu.sh --name $NAME --zone $ZONE --logs --follow" >&2
fi
(( STATUS )) && status
(( LOGS )) && logs
(( STOP )) && stop
(( DELETE )) && delete
exit 0
