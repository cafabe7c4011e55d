#!/usr/bin/env bash
# Run the trainer in fleet collective mode: one process per visible GPU, or --nproc CPU processes
# (default 2) on a machine without GPUs; predict, export and summary run as a single process.
#
#   bash run_dist.sh {train|eval|test|predict|export|summary} MODEL CONFIG [--nproc N] [--ips IP1,IP2,...]
#                    [-o SECTION.key=value ...] [--weights FILE] [--input VIDEO] [--output FILE] [--onnx]
#
# Worker logs go to log/MODE/workerlog.N (LOG_DIR overrides); PYTHON picks the interpreter (default:
# the repo's .venv, else python3).
set -euo pipefail

usage() {
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
[ $# -ge 3 ] || usage
mode=$1 model=$2 config=$3
shift 3
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${PYTHON:-}
if [ -z "$py" ]; then
    if [ -x "$here/.venv/bin/python" ]; then py="$here/.venv/bin/python"; else py=python3; fi
fi
# the modes are trainer/main.py's (one list); the single-process ones run without a launcher
{ read -r all_modes; read -r single_modes; } < <(cd "$here" && "$py" -c 'from trainer.main import MODES, SINGLE_PROCESS_MODES
print(*MODES); print(*SINGLE_PROCESS_MODES)')
[[ " $all_modes " == *" $mode "* ]] || { echo "run_dist.sh: unknown mode '$mode' (modes: $all_modes)" >&2; usage; }
[ -f "$config" ] || { echo "run_dist.sh: config file $config does not exist" >&2; exit 2; }

nproc="" ips="" args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --nproc) nproc=${2:?--nproc needs a number}; shift 2 ;;
        --ips) ips=${2:?--ips needs a comma-separated list}; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
if [ -n "$nproc" ] && ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
    echo "run_dist.sh: --nproc must be a number of processes >= 1, got '$nproc'" >&2; exit 2
fi
main=("$here/trainer/main.py" "$mode" --model "$model" -c "$config" "${args[@]}")

if [[ " $single_modes " == *" $mode "* ]]; then
    exec "$py" "${main[@]}"
fi

ngpu=$("$py" -c 'import paddle; print(paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0)' 2>/dev/null | tail -n1 || true)
launch=("$py" -m paddle.distributed.launch --log_dir "${LOG_DIR:-log/$mode}")
[ -n "$ips" ] && launch+=(--ips "$ips")
if [ "${ngpu:-0}" -gt 0 ] 2>/dev/null; then
    n=${nproc:-$ngpu}
    launch+=(--devices "$(seq -s, 0 $((n - 1)))")
else
    n=${nproc:-2}
    # share the cores between the ranks instead of letting each one use them all
    cores=$(nproc 2>/dev/null || echo 2)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / n > 0 ? cores / n : 1 ))}
    launch+=(--nproc_per_node "$n")
fi
log_dir=${LOG_DIR:-log/$mode}
status=0
"${launch[@]}" "${main[@]}" || status=$?
if [ "$status" -ne 0 ]; then
    # the launcher shows one worker's log, often a rank that only aborted because a peer died:
    # show the error each rank reported
    echo "run_dist.sh: $mode failed (exit $status); errors reported by the ranks:" >&2
    for f in "$log_dir"/workerlog.*; do
        [ -f "$f" ] || continue
        errors=$(grep -E "^(config error|(train|eval|test|predict): error)|^[A-Za-z_.]*(Error|Exception)(: |$)|^dali_pipelines: skipping" "$f" | tail -n 5)
        [ -n "$errors" ] && printf '  rank %s (%s):\n%s\n' "${f##*.}" "$f" "$(sed 's/^/    /' <<<"$errors")" >&2
    done
fi
exit "$status"
