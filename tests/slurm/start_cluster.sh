#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this host for the test suite, without systemd:
#   munged + mariadbd + slurmdbd (accounting, so `sacct` works) + slurmctld + slurmd.
# Idempotent: installs the Debian packages if missing, starts only what is not running, and
# restarts slurmctld/slurmd only if the generated slurm.conf changed. Every daemon it starts gets
# a pid file in $SLURM_BASE/run; stop_cluster.sh kills exactly those PIDs. Must run as root.
# Env: SLURM_BASE (state, logs, pid files; default /tmp/smim-slurm), SLURM_CRED_EXPIRE (default 10),
#      SLURM_DB_PORT (private MariaDB on 127.0.0.1; default 3307).
set -euo pipefail

BASE=${SLURM_BASE:-/tmp/smim-slurm}
CRED_EXPIRE=${SLURM_CRED_EXPIRE:-10}   # also the delay before a requeued job may start again (default 120)
DB_PORT=${SLURM_DB_PORT:-3307}
CLUSTER=smimtest
PARTITION=debug
RUN=$BASE/run LOG=$BASE/log ETC=$BASE/etc STATE=$BASE/state
T0=$EPOCHREALTIME

log() { awk -v a="$EPOCHREALTIME" -v b="$T0" -v m="$*" 'BEGIN{printf "[start_cluster %5.1fs] %s\n", a-b, m}'; }
die() { log "ERROR: $*" >&2; exit 1; }
# daemon_failed NAME LOGFILE: error naming the log file, with its tail
daemon_failed() { die "$1 failed to start; see $2:
$(tail -n 15 "$2" 2>/dev/null || echo '(log file missing)')"; }
# alive PIDFILE COMM: the pid in PIDFILE runs and is COMM (guards against pid reuse)
alive() { local p; [ -s "$1" ] && p=$(cat "$1") && [ -r "/proc/$p/comm" ] && [ "$(cat "/proc/$p/comm")" = "$2" ]; }
wait_for() { local n=$1; shift; for _ in $(seq 1 $((n * 4))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done; return 1; }
# wait_up SECONDS NAME CMD...: wait until CMD succeeds (each try cut off after 5 s); exit with
# daemon_failed at once if daemon NAME died (its pid file names a dead process); 1 on timeout
wait_up() {
  local end=$((SECONDS + $1)) name=$2; shift 2
  while [ $SECONDS -lt $end ]; do
    timeout 5 "$@" >/dev/null 2>&1 && return 0
    if [ -s "$RUN/$name.pid" ] && ! alive "$RUN/$name.pid" "$name"; then daemon_failed "$name" "$(logfile "$name")"; fi
    sleep 0.25
  done
  return 1
}
logfile() { case $1 in mariadbd) echo "$LOG/mariadb.err" ;; *) echo "$LOG/$1.log" ;; esac; }
# port_free PORT: nothing accepts connections on 127.0.0.1:PORT
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# start_daemon NAME PORT: start /usr/sbin/NAME (it daemonizes itself and writes $RUN/NAME.pid), unless a
# NAME not started by this script is running or PORT is taken
start_daemon() {
  local name=$1 pids
  pids=$(pgrep -x "$name" | tr '\n' ' ' || true)
  [ -z "${pids// /}" ] || die "a $name not started by this script is running (pid $pids); stop it first"
  port_free "$2" || die "port $2, needed by $name, is already in use"
  rm -f "$RUN/$name.pid"
  "/usr/sbin/$name" </dev/null >>"$LOG/$name.out" 2>&1 || daemon_failed "$name" "$(logfile "$name")"
}

[ "$(id -u)" = 0 ] || die "must run as root"
mkdir -p "$RUN" "$LOG" "$ETC" "$STATE/ctld" "$STATE/d"

# ---------------------------------------------------------------- 1. packages
missing=""
for p in slurmctld slurmd slurm-client slurmdbd munge mariadb-server procps; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  log "installing:$missing (log: $LOG/apt.log)"
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then   # keep the postinst scripts from starting the daemons
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get -o DPkg::Lock::Timeout=600 update -qq >"$LOG/apt.log" 2>&1 || true
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends \
    $missing >>"$LOG/apt.log" 2>&1 || die "apt-get install failed; see $LOG/apt.log:
$(tail -n 20 "$LOG/apt.log")"
  if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
  log "installed $(slurmctld -V)"
fi

# ---------------------------------------------------------------- 2. munge (a running system munged is reused)
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  alive "$RUN/munged.pid" munged || rm -f "$RUN/munged.pid"   # not ours: stop_cluster.sh leaves it alone
else
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid </dev/null >>"$LOG/munged.out" 2>&1 \
    || daemon_failed munged /var/log/munge/munged.log
  cp /run/munge/munged.pid "$RUN/munged.pid"   # marks it as ours
  wait_for 10 sh -c 'munge -n | unmunge' || daemon_failed munged /var/log/munge/munged.log
  log "munged started (pid $(cat "$RUN/munged.pid"))"
fi

# ---------------------------------------------------------------- 3. slurm.conf (before slurmdbd: sacctmgr reads it)
HOST=$(hostname -s)
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >>/etc/hosts
# slurmd -C prints the real topology (NodeName=<host> CPUs=.. ... RealMemory=<MiB>); keep RealMemory
# under MemAvailable or slurmd registers with less memory than configured and the node is drained
NODELINE=$(slurmd -C | head -1)
AVAIL_MB=$(awk '/^MemAvailable:/{print int($2/1024*0.9)}' /proc/meminfo)
NODELINE=$(sed -E "s/RealMemory=[0-9]+/RealMemory=$AVAIL_MB/" <<<"$NODELINE")
cat >"$ETC/slurm.conf.new" <<EOF
# generated by tests/slurm/start_cluster.sh -- single node, no cgroups, no systemd
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=$CRED_EXPIRE
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
MailProg=/bin/true
JobRequeue=0
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
$NODELINE
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=ALL MaxTime=10 State=UP
EOF
# RealMemory drifts with MemAvailable: a change of the NodeName line alone restarts nothing
running=0; { alive "$RUN/slurmctld.pid" slurmctld || alive "$RUN/slurmd.pid" slurmd; } && running=1
main_changed=0
cmp -s <(grep -v '^NodeName=' "$ETC/slurm.conf.new") <(grep -v '^NodeName=' /etc/slurm/slurm.conf 2>/dev/null) || main_changed=1
if [ $main_changed = 1 ] || { [ $running = 0 ] && ! cmp -s "$ETC/slurm.conf.new" /etc/slurm/slurm.conf; }; then
  mv "$ETC/slurm.conf.new" "$ETC/slurm.conf"
  install -d /etc/slurm; cp "$ETC/slurm.conf" /etc/slurm/slurm.conf
  for d in slurmd slurmctld; do
    if [ $main_changed = 1 ] && alive "$RUN/$d.pid" $d; then
      log "slurm.conf changed: restarting $d"
      pid=$(cat "$RUN/$d.pid"); kill "$pid"; wait_for 20 sh -c "! kill -0 $pid" || kill -KILL "$pid"
    fi
  done
else
  rm -f "$ETC/slurm.conf.new"
fi

# ---------------------------------------------------------------- 4. accounting: private MariaDB + slurmdbd
if ! alive "$RUN/mariadbd.pid" mariadbd; then
  if [ ! -d "$STATE/mysql/mysql" ]; then
    mariadb-install-db --no-defaults --user=root --datadir="$STATE/mysql" \
      --auth-root-authentication-method=socket --skip-test-db >"$LOG/mariadb-install.log" 2>&1 \
      || daemon_failed mariadb-install-db "$LOG/mariadb-install.log"
  fi
  port_free "$DB_PORT" || die "port $DB_PORT, needed by mariadbd, is already in use (set SLURM_DB_PORT)"
  # setsid + all output to files: the daemon must not hold the caller's stdout/stderr pipes open;
  # not a process group leader, setsid execs mariadbd itself, so $! is its pid
  setsid /usr/sbin/mariadbd --no-defaults --user=root --datadir="$STATE/mysql" \
    --socket="$RUN/mysqld.sock" --pid-file="$RUN/mariadbd.pid" --bind-address=127.0.0.1 \
    --port="$DB_PORT" --log-error="$LOG/mariadb.err" --innodb-buffer-pool-size=64M \
    --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
  echo $! >"$RUN/mariadbd.pid"
  wait_up 60 mariadbd mariadb --no-defaults --socket="$RUN/mysqld.sock" -u root -e 'select 1' \
    || daemon_failed mariadbd "$LOG/mariadb.err"
  log "mariadbd started (pid $(cat "$RUN/mariadbd.pid"))"
fi
mariadb --no-defaults --socket="$RUN/mysqld.sock" -u root -e "
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" || die "could not create the slurm database"
cat >"$ETC/slurmdbd.conf" <<EOF
# generated by tests/slurm/start_cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
install -m 600 "$ETC/slurmdbd.conf" /etc/slurm/slurmdbd.conf
if ! alive "$RUN/slurmdbd.pid" slurmdbd; then
  start_daemon slurmdbd 6819
  # slurmctld's first start (no state files yet) is fatal if slurmdbd is not answering yet
  wait_up 60 slurmdbd sacctmgr -n show cluster || daemon_failed "slurmdbd (not answering)" "$LOG/slurmdbd.log"
  log "slurmdbd started (pid $(cat "$RUN/slurmdbd.pid"))"
fi

# ---------------------------------------------------------------- 5. slurmctld + slurmd
if ! alive "$RUN/slurmctld.pid" slurmctld; then
  start_daemon slurmctld 6817
  wait_up 30 slurmctld sh -c "scontrol ping | grep -q UP" || daemon_failed "slurmctld (not answering)" "$LOG/slurmctld.log"
  log "slurmctld started (pid $(cat "$RUN/slurmctld.pid"))"
fi
if ! alive "$RUN/slurmd.pid" slurmd; then
  start_daemon slurmd 6818
  wait_up 15 slurmd test -s "$RUN/slurmd.pid" || daemon_failed slurmd "$LOG/slurmd.log"
  log "slurmd started (pid $(cat "$RUN/slurmd.pid"))"
fi

# ---------------------------------------------------------------- 6. node usable, cluster registered, smoke test
NODE_OK="sinfo -h -n $HOST -o %T | grep -Eq '^(idle|mixed|allocated|completing)\$'"
if ! wait_up 20 slurmd sh -c "$NODE_OK"; then
  log "node state: $(sinfo -h -n "$HOST" -o '%T %E'); resuming it"
  scontrol update NodeName="$HOST" State=RESUME || true
  wait_up 20 slurmd sh -c "$NODE_OK" || die "node not usable: $(sinfo -N -h -o '%N %T %E'); see $LOG/slurmd.log"
fi
wait_for 30 sh -c "sacctmgr -n -P show cluster format=cluster | grep -qx $CLUSTER" \
  || daemon_failed "slurmctld (registration with slurmdbd)" "$LOG/slurmctld.log"
out=$(timeout 60 srun -p "$PARTITION" -t 1 -J smoke hostname 2>&1) \
  || die "srun smoke test failed: $out; see $LOG/slurmctld.log and $LOG/slurmd.log"
log "cluster ready (srun ran on $out): $(sinfo -h -o '%P %a %D %T %N')"
