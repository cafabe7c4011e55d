#!/usr/bin/env bash
# Run the trainer in fleet collective mode: one process per visible GPU, or --nproc CPU processes
# (default 2) on a machine without GPUs; predict, export and summary run as a single process.
# `bash run_dist.sh --help` lists the modes and every option (help_text below).
set -euo pipefail

help_text() {
    cat <<'EOF_HELP'
usage: bash run_dist.sh MODE MODEL CONFIG [launch options] [trainer options]
       bash run_dist.sh selftest [--no-bench] [--only CHECK ...] [--work DIR] [--report FILE]
       bash run_dist.sh --help

Runs trainer/main.py in fleet collective mode: one rank per visible GPU, or --nproc CPU processes
(default 2) on a machine without GPUs; predict, export and summary run as a single process.

modes:
  train      train MODEL on the config's DATASET.train_list (evaluating DATASET.val_list every val_interval)
  eval       top-1/top-5 of a checkpoint on DATASET.val_list
  test       multi-clip, multi-crop test of a checkpoint on DATASET.test_list
  predict    top-k classes of videos (--input); a timeline with --window; an exported model with --exported
  export     the Paddle Inference model (+ ONNX with --onnx), checked against the dynamic model
  summary    the summary of a finished training run (OUTPUT_DIR/metrics.jsonl)
  selftest   checks of a GPU host, PASS / FAIL / SKIP each (tools/selftest.py --help; docs/gpu.md)
MODEL must match the config's MODEL.name (TSN, TSM, PP-TSM, PP-TSMv2); CONFIG is a YAML file (configs/).

launch options (this script):
  --nproc N                  ranks: default one per GPU, else 2 CPU processes
  --gpus 0,1,...             entries of CUDA_VISIBLE_DEVICES to run on (PaddleVideo's spelling)
  --max-restarts N           train: restart a crashed job up to N times from its last checkpoint (default 0)
  --ips IP1,IP2,...          several hosts: every node's address, the first one leads; run this on each node
  --host IP                  this node's address among --ips (default TSN_HOST, else its interfaces' address)
  --rendezvous-timeout S     seconds the nodes and the ranks wait for each other (default 300)

trainer options (passed on to trainer/main.py; `python trainer/main.py --help` says more):
  -o SECTION.key=value       set one config key (repeatable), e.g. -o epochs=5 -o resume=auto
  --weights FILE             eval, test, predict, export: the weights (default OUTPUT_DIR/best.pdparams)
  --input SOURCE             predict: a video, a .txt list of videos, a folder, or a live source
                             (-, a FIFO, udp://, rtsp://...)
  --top-k K                  predict: classes shown per video (default 5)
  --output PATH              predict: also a CSV of the predictions (the folder of a timeline);
                             export: the folder (default OUTPUT_DIR/inference)
  --window LEN               predict: score a long video or a stream window by window (10s, or 250 frames)
  --stride LEN               predict --window: start a window this often (default half the window)
  --min-segment S            predict --window: the shortest segment of segments.csv (default a window)
  --max-seconds S            predict on a live stream: stop after S seconds
  --timeout S                predict on a live stream: seconds without data before it counts as stalled
  --exported DIR             predict with the model export wrote to DIR
  --backend B                predict --exported: paddle (Paddle Inference, default), onnx or tensorrt
  --tensorrt fp32|fp16       TensorRT's precision: predict --backend tensorrt (fp32), export's check (fp16)
  --onnx                     export: also model.onnx
  --opset N                  export --onnx: the ONNX opset (default 13)
  --check-list LIST          export: check the exported model on this list's clips (default DATASET.val_list)
  --check-clips N            export: clips checked (default 8)
  --validate                 train: PaddleVideo's flag (evaluation needs DATASET.val_list)
  --model NAME               set from MODEL; PaddleVideo's other spellings are translated or named

environment:
  LOG_DIR      the ranks' logs (workerlog.N) and their exit records (default log/MODE)
  PYTHON       the interpreter (default the repo's .venv, else python3)
  STOP_TIMEOUT seconds from SIGTERM to SIGKILL of the ranks when this script is stopped (default 30)
  MASTER_PORT, RENDEZVOUS_PORT   ports on the first node of --ips (default 6070, 6069)
  TSN_LOG_FORMAT                 the format of the ranks' messages (common/log.py)
SIGTERM/SIGINT stop every process of the run; a kill -9 of this script or of the launcher ends every
rank too (common/lifeline.py). Exit status: the failed rank's (2: a config or usage error).
EOF_HELP
}
usage() {
    help_text | sed -n '1,3p' >&2
    echo "(bash run_dist.sh --help lists the modes and options)" >&2
    exit 2
}
for arg in "$@"; do
    case "$arg" in -h | --help) [ "${1:-}" = selftest ] || { help_text; exit 0; } ;; esac
done
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${PYTHON:-}
if [ -z "$py" ]; then
    if [ -x "$here/.venv/bin/python" ]; then py="$here/.venv/bin/python"; else py=python3; fi
fi
# the repo's packages for `python -m` from any folder, the ranks included (an interpreter without
# `pip install -e .` too); trainer/main.py is still run by path, as Paddle's launcher runs a script
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" = selftest ]; then  # the GPU host self-test (tools/selftest.py): PASS / FAIL / SKIP per check
    cd "$here" && exec "$py" -m tools.selftest "${@:2}"
fi
[ $# -ge 3 ] || usage
mode=$1 model=$2 config=$3
shift 3
# the modes are trainer/main.py's (one list); the single-process ones run without a launcher
{ read -r all_modes; read -r single_modes; } < <(cd "$here" && "$py" -c 'from trainer.main import MODES, SINGLE_PROCESS_MODES
print(*MODES); print(*SINGLE_PROCESS_MODES)')
[[ " $all_modes " == *" $mode "* ]] || { echo "run_dist.sh: unknown mode '$mode' (modes: $all_modes)" >&2; usage; }
[ -f "$config" ] || { echo "run_dist.sh: config file $config does not exist" >&2; exit 2; }

nproc="" ips="" host=${TSN_HOST:-} rdv_timeout=${RENDEZVOUS_TIMEOUT:-300} restarts=0 args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --nproc) nproc=${2:?--nproc needs a number}; shift 2 ;;
        --ips) ips=${2:?--ips needs a comma-separated list}; shift 2 ;;
        --host) host=${2:?--host needs this node\'s address}; shift 2 ;;
        --rendezvous-timeout) rdv_timeout=${2:?--rendezvous-timeout needs seconds}; shift 2 ;;
        --max-restarts) restarts=${2:?--max-restarts needs a number}; shift 2 ;;
        --gpus) gpus=${2:?--gpus needs a comma-separated list of GPUs}; shift 2 ;;  # PaddleVideo's spelling
        --gpus=*) gpus=${1#--gpus=}; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
if [ -n "${gpus:-}" ]; then
    # --gpus 0,1,2,3 as PaddleVideo's launcher reads it: entries of CUDA_VISIBLE_DEVICES (all GPUs when unset)
    if ! [[ "$gpus" =~ ^[^,[:space:]]+(,[^,[:space:]]+)*$ ]]; then
        echo "run_dist.sh: --gpus takes a comma-separated list of GPUs such as 0,1,2,3, got '$gpus'" >&2; exit 2
    fi
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        for g in ${gpus//,/ }; do
            if [[ ",$CUDA_VISIBLE_DEVICES," != *",$g,"* ]]; then
                echo "run_dist.sh: --gpus $gpus: GPU $g is not among CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES (name its entries, or unset it)" >&2; exit 2
            fi
        done
    fi
    export CUDA_VISIBLE_DEVICES=$gpus
    read -r _ gpu_devices _ < <(cd "$here" && "$py" -m launch.ranks 2>/dev/null) || true
    if [ "${gpu_devices:-cpu}" = cpu ]; then
        echo "run_dist.sh: --gpus $gpus: this host has no GPU that Paddle can use; leave --gpus out (--nproc N sets the CPU processes)" >&2; exit 2
    fi
    if [[ " $single_modes " == *" $mode "* && "$gpus" == *,* ]]; then
        echo "run_dist.sh: $mode runs as one process on one GPU: write --gpus ${gpus%%,*}" >&2; exit 2
    fi
fi
if [ -n "$nproc" ] && ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
    echo "run_dist.sh: --nproc must be a number of processes >= 1, got '$nproc'" >&2; exit 2
fi
if ! [[ "$rdv_timeout" =~ ^[1-9][0-9]*$ ]]; then
    echo "run_dist.sh: --rendezvous-timeout must be a number of seconds >= 1, got '$rdv_timeout'" >&2; exit 2
fi
if ! [[ "$restarts" =~ ^[0-9]+$ ]]; then
    echo "run_dist.sh: --max-restarts must be a number >= 0, got '$restarts'" >&2; exit 2
fi
# PaddleVideo's spellings without a counterpart are one line here, not one per rank (trainer/spellings.py)
(cd "$here" && "$py" -m trainer.spellings ${args[@]+"${args[@]}"}) || exit 2
main=("$here/trainer/main.py" "$mode" --model "$model" -c "$config" "${args[@]}")

if [[ " $single_modes " == *" $mode "* ]]; then
    exec "$py" "${main[@]}"
fi

# ranks and devices: one rank per GPU (more than there are is an error), else 2 CPU processes; devices are
# entries of CUDA_VISIBLE_DEVICES, which is what the launcher's --devices takes (launch/ranks.py)
read -r n devices cvd < <(cd "$here" && "$py" -m launch.ranks ${nproc:+--nproc "$nproc"}) || exit 2
log_dir=${LOG_DIR:-log/$mode}
# Paddle's launcher, through launch/paddle_launch.py: it dies with this script and its ranks die with
# it, whatever signal ends either (common/lifeline.py: TSN_PARENT_PID names the parent each one checks);
# it notes how each rank ended, and each rank writes why, into the log folder (common/exits.py)
launch=("$py" -m launch.paddle_launch --log_dir "$log_dir")
export TSN_PARENT_PID=$$ TSN_EXIT_DIR
TSN_EXIT_DIR=$(realpath -m "$log_dir")  # made by the launcher, not before the nodes meet
nnodes=1
if [ -n "$ips" ]; then
    # several hosts: this node is the one of --ips among its interfaces' addresses (launch/hosts.py),
    # not what its hostname resolves to; Paddle's launcher is told so (launch/paddle_launch.py)
    read -r node_index node_ip node_if < <(cd "$here" && "$py" -m launch.hosts plan --ips "$ips" ${host:+--host "$host"}) || exit 2
    nnodes=$(tr ',' '\n' <<<"$ips" | grep -c .)
    first=${ips%%,*} master_port=${MASTER_PORT:-6070} rdv_port=${RENDEZVOUS_PORT:-6069}
    echo "run_dist.sh: node $node_index of $nnodes ($node_ip on ${node_if}); nodes meet at $first:$rdv_port within ${rdv_timeout}s, then Paddle's master (TCP store) is $first:$master_port" >&2
    export TSN_NODE_IP=$node_ip
    if [ "$node_if" != - ]; then  # gloo and NCCL would otherwise use the address the hostname resolves to
        export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$node_if} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$node_if}
    fi
    launch=("$py" -m launch.paddle_launch --log_dir "$log_dir" --ips "$ips" --start_port "$master_port")
fi
# the trainers' own rendezvous (fleet.init) is bounded by the same time (trainer/dist.py)
export TSN_RENDEZVOUS_TIMEOUT=$rdv_timeout
if [ "$devices" != cpu ]; then
    launch+=(--devices "$devices")
else
    # CPU ranks talk through gloo on any build (a CUDA build would pick NCCL), and a CPU build's launcher
    # must not take CUDA_VISIBLE_DEVICES' entries for GPUs (launch/ranks.py, cpu_ranks_env)
    export PADDLE_DISTRI_BACKEND=gloo
    [ "$cvd" != unset ] || unset CUDA_VISIBLE_DEVICES
    # share the cores between the ranks instead of letting each one use them all
    cores=$(nproc 2>/dev/null || echo 2)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / n > 0 ? cores / n : 1 ))}
    launch+=(--nproc_per_node "$n")
fi
# one id for every attempt of this job: a restarted training finds it in its last checkpoint and goes on
# from there (trainer/checkpoint.py, Checkpoints._own_attempt)
export TSN_RUN_ID=${TSN_RUN_ID:-$(date +%Y%m%d-%H%M%S)-$$}

# The launcher runs in a session of its own, so that a signal to this script (scancel, a time limit,
# Ctrl-C, kill PID) reaches the launcher, every rank and their workers as one process group: TERM
# first, KILL for what is left after STOP_TIMEOUT seconds.
stop_timeout=${STOP_TIMEOUT:-30}
stopped="" pid=""
stop() {
    stopped=$1
    echo "run_dist.sh: $1: stopping the launcher and every rank (at most ${stop_timeout}s)" >&2
    [ -n "$pid" ] || return 0
    kill -TERM -- "-$pid" 2>/dev/null || true
    for ((i = 0; i < stop_timeout * 10; i++)); do
        kill -0 -- "-$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    echo "run_dist.sh: still running after ${stop_timeout}s: killing them" >&2
    kill -KILL -- "-$pid" 2>/dev/null || true
}
trap 'stop SIGTERM' TERM
trap 'stop SIGINT' INT
trap 'stop SIGHUP' HUP

# Run "$@" in a session of its own and wait for it; status: its exit status, or 130/143 when a signal
# stopped this script. Nothing of it outlives it (the ranks' feed workers included).
run_in_session() {
    setsid "$@" &
    pid=$!
    status=0
    wait "$pid" || status=$?
    while kill -0 "$pid" 2>/dev/null; do  # a trapped signal ends the first wait early
        wait "$pid" || status=$?
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    if [ -n "$stopped" ]; then
        status=$([ "$stopped" = SIGINT ] && echo 130 || echo 143)
    fi
}

# The cause (the rank that failed first on its own account, and how) and the others, from the ranks'
# and the launcher's records (common/exits.py); status: 0 a restart may help, 3 it cannot (config,
# data, usage, output errors), else no record (the launcher itself was killed): then the last
# warnings and errors each rank logged (events.R.jsonl, common/log.py). Sets cause_text and cause_status.
cause() {
    cause_status=0
    cause_text=$("$py" -m common.exits report "$TSN_EXIT_DIR" 2>&1) || cause_status=$?
    if [ "$cause_status" -ne 0 ] && [ "$cause_status" -ne 3 ]; then
        if [ "$status" -gt 128 ] && [ "$status" -le 192 ]; then
            cause_text+=$'\n'"  the launcher ended by SIG$(kill -l $((status - 128)) 2>/dev/null), and every rank with it"
        fi
        notes=$("$py" -m common.exits notes "$TSN_EXIT_DIR" 2>/dev/null) || true
        [ -z "$notes" ] || cause_text+=$'\n'$notes
    fi
}

attempt=0
while :; do
    "$py" -m common.exits clear "$log_dir"  # the records of an earlier attempt (exit, launcher, reading, events)
    if [ "$nnodes" -gt 1 ]; then  # every node joins within the timeout, or every node stops and says which did not
        run_in_session "$py" -m launch.hosts rendezvous --ips "$ips" --index "$node_index" --port "$rdv_port" --timeout "$rdv_timeout"
        [ "$status" -eq 0 ] || exit "$status"
    fi
    run_in_session "${launch[@]}" "${main[@]}"
    if [ "$status" -eq 0 ] || [ -n "$stopped" ] || [ "$mode" != train ] || [ "$attempt" -ge "$restarts" ]; then
        break
    fi
    # Paddle's launcher restarts ranks only under an etcd master (--master etcd://...): restart here,
    # unless the cause is not a crash (a config, data, usage or output error fails the same way again)
    cause
    if [ "$cause_status" -eq 3 ]; then
        echo "run_dist.sh: train failed (exit $status); not restarted. Cause:" >&2
        echo "$cause_text" >&2
        reported=1
        break
    fi
    attempt=$((attempt + 1))
    echo "run_dist.sh: train failed (exit $status); restart $attempt of $restarts from the last checkpoint. Cause:" >&2
    echo "$cause_text" >&2
done

if [ "$status" -ne 0 ] && [ -z "${reported:-}" ]; then
    # the launcher shows one worker's log, often a rank that only aborted because a peer died:
    # name the rank that failed first, and how, then the others
    outcome=${stopped:+stopped by $stopped}
    echo "run_dist.sh: $mode ${outcome:-failed} (exit $status). ${stopped:+What the ranks reported}${stopped:-Cause}:" >&2
    cause
    echo "$cause_text" >&2
fi
if [ "$status" -ne 0 ]; then
    # a config or usage error (exit 2), or a cause that is not a crash, is not helped by resuming
    if [ "$mode" = train ] && [ "$status" -ne 2 ] && [ "${cause_status:-0}" -ne 3 ]; then
        echo "run_dist.sh: checkpoints are written whole at the end of each epoch: run the same command with -o resume=auto to continue from the last one" >&2
    fi
fi
exit "$status"
