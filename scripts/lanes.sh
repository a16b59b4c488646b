#!/usr/bin/env bash
# Runs a leg's two lanes side by side and fails if either failed.
#
#   scripts/lanes.sh ENGINE-LANE-COMMAND UNIT-LANE-COMMAND
#
# `make test` calls it with two pytest commands that split the leg's
# selection (Makefile: ENGINES_SELECT, UNITS_SELECT). The engine lane runs
# the multi-rank engines, servers and two-host launches one at a time (never
# two at once: vLLM CPU's spin-waiting shared-memory all-reduce stalls); the
# unit lane runs the gloo worlds, single-process tests and single-rank engines
# beside it, on the core an engine leaves idle through its single-threaded
# start-up. The unit lane runs at a lower priority (nice 10): the engine lane
# is the longer one, and an engine's two ranks exchange many small
# collectives, each waiting for its peer to be scheduled. Each lane is a
# session of its own (so that an interrupted run can stop it whole), and with
# the kernel's autogroup scheduling (sched_autogroup_enabled) a session is a
# scheduling group whose nice is its own: a task's nice ranks it only inside
# its session. So the unit lane sets its session's nice too
# (/proc/self/autogroup); without that, `nice -n 10` left it an equal share
# of the cores. Each line of output is prefixed with its lane; each lane's
# wall time is printed at its end.
#
# LANES_ENGINE_DONE=FILE: touch FILE as soon as the engine lane has ended
# (.ci/run then starts the next leg's engine lane beside this leg's unit lane
# tail). It is taken out of the environment first: a lane's command, or a
# lanes.sh started by a test inside a lane, must never touch the caller's file.
set -uo pipefail

engine_done="${LANES_ENGINE_DONE:-}"
unset LANES_ENGINE_DONE

if [[ $# -ne 2 ]]; then
    echo "usage: $0 ENGINE-LANE-COMMAND UNIT-LANE-COMMAND" >&2
    exit 2
fi

pids=()
stop() {
    for pid in "${pids[@]}"; do kill -- "-$pid" 2>/dev/null; done
}
trap stop EXIT
trap 'exit 130' INT TERM

LOW_NICE=10

run_lane() {  # run_lane NAME NICE COMMAND, as the leader of a new session
    local t0=$SECONDS rc=0
    # The session's scheduling group (absent on kernels without autogroup).
    if [[ $2 != 0 ]]; then echo "$2" 2>/dev/null > /proc/self/autogroup || true; fi
    nice -n "$2" bash -c "$3" || rc=$?
    printf '=== %s lane: rc=%d, %dm%02ds\n' "$1" "$rc" $(((SECONDS - t0) / 60)) \
        $(((SECONDS - t0) % 60))
    return "$rc"
}
export -f run_lane

names=(engine unit)
nices=(0 "$LOW_NICE")
cmds=("$1" "$2")
for i in 0 1; do
    # Its own process group, so that an interrupted run stops the whole lane.
    setsid bash -c 'run_lane "$0" "$1" "$2"' "${names[$i]}" "${nices[$i]}" "${cmds[$i]}" \
        > >(sed -u "s/^/[${names[$i]} lane] /") 2>&1 &
    pids+=($!)
done
failed=0
wait "${pids[0]}" || failed=1  # the engine lane
[[ -n "$engine_done" ]] && touch "$engine_done"
wait "${pids[1]}" || failed=1  # the unit lane
pids=()
wait  # the prefixing pipes
exit "$failed"
