#!/usr/bin/env bash
# A REAL 2-node Slurm cluster on this one machine, for tests: munged + slurmctld + two slurmd (n1, n2).
#
# Usage: tests/slurm/local_cluster.sh {start|stop|status|env}
#   start   install slurm-wlm/munge if missing (root + apt), write configs, start the daemons; idempotent
#   stop    cancel this cluster's jobs, then stop ONLY the daemons started here (by their pid files)
#   status  daemons, nodes and jobs
#   env     print `export SLURM_CONF=... SA_SLURM_NODE_NS=...` for clients (eval "$(... env)")
#
# Environment:
#   SA_SLURM_STATE      state dir: configs, munge key/socket, spool, logs, pid files
#                       [${TMPDIR:-/tmp}/streaming_adapters-slurm]
#   SA_SLURM_PORT       slurmctld port; the slurmds use PORT+1 and PORT+2 [16817]
#   SA_SLURM_CPUS       cores each fake node claims [2]
#   SA_SLURM_NODE_NS    1: each slurmd in its own UTS+mount namespace (hostname n1/n2, private hosts file
#                       naming n1 n2), so jobs resolve node names like on a real cluster; 0: both nodes
#                       are plain 127.0.0.1 and jobs need SA_HEAD_ADDR=127.0.0.1 [1 if unshare works]
#
# Why it looks like this: see docs/slurm.md ("The test cluster") and the facts it cites. Bookworm's Slurm
# 22.05 is built with MULTIPLE_SLURMD, so `slurmd -N n1` and `slurmd -N n2` are two real nodes on loopback.
# There is no systemd here and the package post-install starts nothing, so every daemon is started by hand
# with its own pid file, and stopped by that pid only.
set -euo pipefail

STATE=${SA_SLURM_STATE:-${TMPDIR:-/tmp}/streaming_adapters-slurm}
CTLD_PORT=${SA_SLURM_PORT:-16817}
CPUS=${SA_SLURM_CPUS:-2}
NODE_NS=${SA_SLURM_NODE_NS:-auto}
NODES=(n1 n2)

CONF=$STATE/slurm.conf
MUNGE_DIR=$STATE/munge          # socket folder: munged wants 0755 here
MUNGE_KEYDIR=$STATE/munge-key   # key, seed, log: munged refuses group/other access (0700)
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
RUN=$STATE/run
LOG=$STATE/log

die() { printf 'local_cluster: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'local_cluster: %s\n' "$*"; }

# --- pid-file helpers --------------------------------------------------------------------------------------
# A pid file is only trusted if the process still runs the expected program: a stale file whose pid was
# reused by something else must never get that process killed.
pid_of() {  # pid_of PIDFILE COMM -> prints pid if alive and named COMM
    local file=$1 comm=$2 pid
    [[ -s $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm && $(<"/proc/$pid/comm") == "$comm" ]] || return 1
    printf '%s\n' "$pid"
}

stop_pids() {  # stop_pids PIDFILE:COMM...: TERM them all at once, wait up to 10 s, then KILL
    local spec pid idx i alive=() names=()
    for spec in "$@"; do
        if pid=$(pid_of "${spec%%:*}" "${spec#*:}"); then
            kill -TERM "$pid" 2>/dev/null || true
            alive+=("$pid")
            names+=("${spec#*:} (pid $pid)")
        fi
        rm -f "${spec%%:*}"
    done
    for ((i = 0; i < 100 && ${#alive[@]} > 0; i++)); do
        for idx in "${!alive[@]}"; do [[ -d /proc/${alive[$idx]} ]] || unset 'alive[idx]'; done
        if ((${#alive[@]} > 0)); then sleep 0.1; fi
    done
    for pid in "${alive[@]}"; do
        say "pid $pid ignored SIGTERM for 10 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    done
    ((${#names[@]} == 0)) || say "stopped ${names[*]}"
}

# Waits for a daemon's pid file after it forked into the background; prints its log tail if it died.
wait_started() {  # wait_started PIDFILE COMM LOGFILE
    local i
    for ((i = 0; i < 50; i++)); do
        pid_of "$1" "$2" >/dev/null && return 0
        sleep 0.1
    done
    printf 'local_cluster: error: %s did not start; last lines of %s:\n' "$2" "$3" >&2
    tail -n 20 "$3" >&2 2>/dev/null || true
    exit 1
}

port_busy() { [[ -r /proc/net/tcp ]] && awk -v p="$(printf '%04X' "$1")" \
    'NR > 1 { split($2, a, ":"); if (a[2] == p && $4 == "0A") f = 1 } END { exit !f }' /proc/net/tcp; }

# --- start -------------------------------------------------------------------------------------------------
ensure_packages() {
    local missing=() cmd
    for cmd in munged mungekey slurmctld slurmd sbatch; do
        command -v "$cmd" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin command -v "$cmd" >/dev/null 2>&1 ||
            missing+=("$cmd")
    done
    ((${#missing[@]} == 0)) && return 0
    [[ $EUID -eq 0 ]] || die "missing ${missing[*]}; as root: apt-get install --no-install-recommends slurm-wlm munge"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install slurm-wlm + munge"
    say "installing slurm-wlm munge (missing: ${missing[*]}; ~10 s)"
    # --no-install-recommends: 9 packages / 3.5 MB instead of pulling mail and X11 helpers.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends slurm-wlm munge >/dev/null; } || die "apt-get install slurm-wlm munge failed"
}

write_configs() {
    mkdir -p "$STATE" "$RUN" "$LOG" "$STATE/ctld" "$MUNGE_DIR" "$MUNGE_KEYDIR"
    chmod 0755 "$MUNGE_DIR"
    chmod 0700 "$MUNGE_KEYDIR"
    if [[ ! -s $MUNGE_KEYDIR/munge.key ]]; then
        mungekey --create --keyfile="$MUNGE_KEYDIR/munge.key" >/dev/null
    fi
    chmod 0600 "$MUNGE_KEYDIR/munge.key"

    if [[ $NODE_NS == auto ]]; then
        NODE_NS=0
        [[ $EUID -eq 0 ]] && unshare --mount --uts --propagation private true 2>/dev/null && NODE_NS=1
    fi
    printf '%s\n' "$NODE_NS" >"$STATE/node_ns"
    # The nodes' private hosts file: this machine's entries plus the node names, all on loopback.
    { cat /etc/hosts; printf '127.0.0.1 %s\n' "${NODES[*]}"; } >"$STATE/hosts"

    local i node_lines=""
    for i in "${!NODES[@]}"; do
        mkdir -p "$STATE/slurmd/${NODES[$i]}"
        # Both nodes are this machine: same NodeHostname, distinct ports. config_overrides lets a slurmd
        # report these (fake) core counts instead of failing the node for a hardware mismatch.
        node_lines+="NodeName=${NODES[$i]} NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((CTLD_PORT + 1 + i))"
        node_lines+=" Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 State=UNKNOWN"$'\n'
    done

    cat >"$CONF" <<EOF
# Generated by tests/slurm/local_cluster.sh; regenerated on every cold start.
ClusterName=sa-local
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
# Loopback only: by default the daemons listen on 0.0.0.0.
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmctldLogFile=$LOG/slurmctld.log
# %n = node name: each slurmd needs its own spool, pid and log file.
SlurmdSpoolDir=$STATE/slurmd/%n
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Start a submitted batch job at once: by default slurmctld batches batch-job scheduling for 3 s.
SchedulerParameters=batch_sched_delay=0
MpiDefault=none
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# Keep finished jobs visible to scontrol for 5 min so the test can read JobState/ExitCode.
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
$node_lines
PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP
EOF
}

cmd_start() {
    ensure_packages
    export PATH=$PATH:/usr/sbin SLURM_CONF=$CONF
    local any_running=0 node
    pid_of "$RUN/munged.pid" munged >/dev/null && any_running=1
    pid_of "$RUN/slurmctld.pid" slurmctld >/dev/null && any_running=1
    for node in "${NODES[@]}"; do pid_of "$RUN/slurmd-$node.pid" slurmd >/dev/null && any_running=1; done
    # Rewriting the config under running daemons would desynchronise them; keep it while any runs.
    if ((any_running == 0)); then
        local p
        for p in "$CTLD_PORT" $((CTLD_PORT + 1)) $((CTLD_PORT + 2)); do
            port_busy "$p" && die "port $p is already in use (another Slurm?); set SA_SLURM_PORT to a free base"
        done
        write_configs
    fi
    [[ -s $CONF ]] || die "$CONF is missing but daemons from a previous start run; run '$0 stop' first"

    if ! pid_of "$RUN/munged.pid" munged >/dev/null; then
        rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
        munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEYDIR/munge.key" --pid-file="$RUN/munged.pid" \
            --log-file="$MUNGE_KEYDIR/munged.log" --seed-file="$MUNGE_KEYDIR/munged.seed" ||
            die "munged failed: $(tail -n 5 "$MUNGE_KEYDIR/munged.log" 2>/dev/null)"
        wait_started "$RUN/munged.pid" munged "$MUNGE_KEYDIR/munged.log"
        say "munged running (pid $(<"$RUN/munged.pid"))"
    fi
    if ! pid_of "$RUN/slurmctld.pid" slurmctld >/dev/null; then
        # -c: start from a clean state (no jobs/nodes remembered from an earlier run of this state dir).
        slurmctld -c -f "$CONF" || die "slurmctld failed; see $LOG/slurmctld.log"
        wait_started "$RUN/slurmctld.pid" slurmctld "$LOG/slurmctld.log"
        say "slurmctld running (pid $(<"$RUN/slurmctld.pid"), port $CTLD_PORT)"
    fi
    for node in "${NODES[@]}"; do
        if ! pid_of "$RUN/slurmd-$node.pid" slurmd >/dev/null; then
            start_slurmd "$node" || die "slurmd -N $node failed; see $LOG/slurmd-$node.log"
            wait_started "$RUN/slurmd-$node.pid" slurmd "$LOG/slurmd-$node.log"
            say "slurmd $node running (pid $(<"$RUN/slurmd-$node.pid"))"
        fi
    done
    wait_nodes_idle
    say "ready (node namespaces: $(<"$STATE/node_ns")): export SLURM_CONF=$CONF"
}

start_slurmd() {
    local node=$1
    # Always pass -N: a slurmd without it silently takes over n1 and kills the running n1 daemon.
    if [[ $(<"$STATE/node_ns") == 1 ]]; then
        # Own UTS + mount namespace: `hostname` says n1/n2 and n1/n2 resolve (to 127.0.0.1) for slurmd and
        # every job step it forks, while the machine's /etc/hosts and hostname stay untouched. No pid
        # namespace, so the pid file holds a pid that `stop` can signal from here.
        # shellcheck disable=SC2016  # $1..$3 are the inner sh's arguments
        unshare --mount --uts --propagation private sh -c \
            'mount --bind "$1" /etc/hosts && hostname "$2" && exec slurmd -N "$2" -f "$3"' \
            sh "$STATE/hosts" "$node" "$CONF"
    else
        slurmd -N "$node" -f "$CONF"
    fi
}

wait_nodes_idle() {  # registration takes well under a second; 20 s means something is wrong
    local i states
    for ((i = 0; i < 200; i++)); do
        states=$(sinfo -h -N -o '%N=%T' 2>/dev/null | sort -u | tr '\n' ' ') || true
        if [[ $states =~ n1=(idle|mixed|allocated) && $states =~ n2=(idle|mixed|allocated) ]]; then return 0; fi
        sleep 0.1
    done
    die "nodes not idle after 20 s (sinfo: ${states:-nothing}); see $LOG/"
}

# --- stop / status -----------------------------------------------------------------------------------------
cmd_stop() {
    export PATH=$PATH:/usr/sbin SLURM_CONF=$CONF
    local node i
    if pid_of "$RUN/slurmctld.pid" slurmctld >/dev/null; then
        # slurmstepd belongs to no pid file: cancel the jobs so that the steps end with them.
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ') || true
        if [[ -n ${jobs// /} ]]; then
            say "cancelling jobs: $jobs"
            # shellcheck disable=SC2086  # word-split job ids on purpose
            scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 150; i++)); do
                [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
                sleep 0.1
            done
        fi
    fi
    # Slurm daemons together (each takes ~1.5-2 s to shut down; none needs another to do so), then munge,
    # which they use until they are gone.
    local specs=("$RUN/slurmctld.pid:slurmctld")
    for node in "${NODES[@]}"; do specs+=("$RUN/slurmd-$node.pid:slurmd"); done
    stop_pids "${specs[@]}"
    stop_pids "$RUN/munged.pid:munged"
}

cmd_status() {
    export PATH=$PATH:/usr/sbin SLURM_CONF=$CONF
    local spec pid rc=0
    printf 'state dir: %s  node namespaces: %s\n' "$STATE" "$(cat "$STATE/node_ns" 2>/dev/null || echo '?')"
    for spec in "munged:munged" "slurmctld:slurmctld" "slurmd-n1:slurmd" "slurmd-n2:slurmd"; do
        if pid=$(pid_of "$RUN/${spec%%:*}.pid" "${spec#*:}"); then
            printf '  %-10s running (pid %s)\n' "${spec%%:*}" "$pid"
        else
            printf '  %-10s stopped\n' "${spec%%:*}"; rc=3
        fi
    done
    if pid_of "$RUN/slurmctld.pid" slurmctld >/dev/null; then
        sinfo -N -o '%N %T %c' || true
        squeue || true
    fi
    return "$rc"
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) printf 'export SLURM_CONF=%q SA_SLURM_NODE_NS=%q\n' "$CONF" "$(cat "$STATE/node_ns" 2>/dev/null || echo 0)" ;;
    *) die "usage: $0 {start|stop|status|env}" ;;
esac
