#!/usr/bin/env bash
# Stop the cluster started by start_cluster.sh: cancel its jobs, then kill each daemon by the PID in
# the pid file that start_cluster.sh recorded (checking /proc/PID/comm first, so a reused PID is
# never hit). munged is stopped only if start_cluster.sh started it. State (job ids, accounting
# database) is kept for the next start; delete $SLURM_BASE to wipe it.
set -uo pipefail
BASE=${SLURM_BASE:-/tmp/smim-slurm}
RUN=$BASE/run

alive() { local p; [ -s "$1" ] && p=$(cat "$1") && [ -r "/proc/$p/comm" ] && [ "$(cat "/proc/$p/comm")" = "$2" ]; }
any_alive() { local p; for p; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
stop() {  # stop NAME...: TERM the pids in $RUN/NAME.pid together, wait, KILL what is left after 15 s
  local name pid pids=() names=()
  for name in "$@"; do
    if alive "$RUN/$name.pid" "$name"; then
      pid=$(cat "$RUN/$name.pid"); kill -TERM "$pid"; pids+=("$pid"); names+=("$name")
    else
      echo "$name: not running"
    fi
    rm -f "$RUN/$name.pid"
  done
  [ ${#pids[@]} = 0 ] && return 0
  for _ in $(seq 1 60); do any_alive "${pids[@]}" || break; sleep 0.25; done
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${names[$i]}" ]; then
      echo "${names[$i]}: pid $pid ignored TERM, sending KILL"; kill -KILL "$pid"
    fi
    echo "${names[$i]}: stopped pid $pid"
  done
}

if alive "$RUN/slurmctld.pid" slurmctld; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    echo "cancelling jobs: $jobs"; scancel $jobs 2>/dev/null
    for _ in $(seq 1 60); do [ -z "$(squeue -h -t R,CG,PD,RQ,RS -o %A 2>/dev/null)" ] && break; sleep 0.25; done
  fi
fi
# in stages: slurmctld flushes accounting to slurmdbd, which writes to MariaDB; all need munged
stop slurmd slurmctld
stop slurmdbd
if [ -s "$RUN/munged.pid" ]; then
  stop mariadbd munged; rm -f /run/munge/munged.pid
else
  stop mariadbd; echo "munged: not started by start_cluster.sh, left alone"
fi
left=$(pgrep -x slurmstepd | tr '\n' ' ')
[ -n "$left" ] && echo "WARNING: slurmstepd still running (pids: $left)"
exit 0
