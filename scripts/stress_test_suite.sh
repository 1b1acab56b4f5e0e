#!/usr/bin/env bash
# Run a test command repeatedly while CPU-burning processes compete for the cores (a busy machine).
#
#   scripts/stress_test_suite.sh [-r RUNS] [-b BURNERS] [-- COMMAND ...]
#
# Defaults: 3 runs, 2 burners, the README's test command (`make test`). Prints one line per run and a summary,
# exits 1 if any run failed. The burners are stopped however the script ends.
set -u
runs=3
burners=2
while [ $# -gt 0 ]; do
    case "$1" in
        -r) runs="$2"; shift 2 ;;
        -b) burners="$2"; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) echo "error: unknown option $1" >&2; echo "  hint: scripts/stress_test_suite.sh [-r RUNS] [-b BURNERS] [-- COMMAND ...]" >&2; exit 2 ;;
    esac
done
if [ $# -eq 0 ]; then set -- make test; fi
cd "$(dirname "$0")/.."
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; }
trap cleanup EXIT INT TERM
for _ in $(seq "$burners"); do
    python3 -c "while True: pass" &
    pids+=("$!")
done
failed=0
for i in $(seq "$runs"); do
    start=$(date +%s)
    if "$@" > "/tmp/stress_run_$i.log" 2>&1; then status=passed; else status=FAILED; failed=$((failed + 1)); fi
    echo "run $i/$runs: $status in $(( $(date +%s) - start )) s ($(tail -n 1 "/tmp/stress_run_$i.log"))"
done
echo "$((runs - failed)) passed, $failed failed (runs of: $*; $burners CPU burners beside it)"
[ "$failed" -eq 0 ]
