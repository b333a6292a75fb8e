#!/usr/bin/env bash
# Real Apache Kafka (KRaft: one combined broker+controller node) on 127.0.0.1, from the broker's
# jars on Maven Central — no Docker, no tarball. Needs Java 17+ and Maven (`mvn`) for the fetch.
#
#   bash deploy/kafka.sh fetch                    # jars -> .kafka/libs (once; re-fetched when the pom changes)
#   bash deploy/kafka.sh start  [options]         # fetch, format, start, wait; prints host:port
#   bash deploy/kafka.sh status [--run-dir DIR]   # prints host:port; exit 1 when not running
#   bash deploy/kafka.sh stop   [--run-dir DIR]   # SIGTERM its pid (SIGKILL after --timeout s)
#
# start options:
#   --run-dir DIR     state: pid, bootstrap, server.properties, kafka.log, data/ (default .kafka/run)
#   --port N          client port (default: a free one; the controller port is always a free one)
#   --keep-data       reuse DIR's formatted storage and ports (a broker restart) instead of a fresh node
#   --watch-pid PID   stop the broker when process PID exits (used by the test session)
#   --timeout S       seconds to wait until it answers (default 90)
# Env: BREAKWATER_KAFKA_HOME (cache, default <repo>/.kafka), BREAKWATER_KAFKA_HEAP (default 384m),
#      JAVA (default java), PYTHON (picks free ports; default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$ROOT/deploy/kafka.sh"
CONF="$ROOT/deploy/kafka"
HOME_DIR="${BREAKWATER_KAFKA_HOME:-$ROOT/.kafka}"
LIBS="$HOME_DIR/libs"
HEAP="${BREAKWATER_KAFKA_HEAP:-384m}"
JAVA="${JAVA:-java}"
PYTHON="${PYTHON:-python3}"
HOST=127.0.0.1

say() { echo "kafka.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

usage() { sed -n '2,17p' "$SELF" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# ------------------------------------------------------------------------------------ fetch

fetch() {
  local want stamp tmp
  want="$(sha256sum "$CONF/pom.xml" | cut -d' ' -f1)"
  stamp="$LIBS/.pom.sha256"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  command -v mvn >/dev/null 2>&1 || die "Maven (mvn) not found: install it (Debian: apt-get install maven)"
  mkdir -p "$HOME_DIR"
  tmp="$(mktemp -d "$HOME_DIR/libs.fetch.XXXXXX")"
  say "fetching the Kafka broker's jars from Maven Central (deploy/kafka/pom.xml) ..."
  if ! mvn -q -B -f "$CONF/pom.xml" dependency:copy-dependencies \
       -DincludeScope=runtime -DoutputDirectory="$tmp" >"$tmp.log" 2>&1; then
    tail -n 30 "$tmp.log" >&2 || true
    rm -rf "$tmp" "$tmp.log"
    die "mvn dependency:copy-dependencies failed"
  fi
  rm -f "$tmp.log"
  ls "$tmp"/kafka_2.13-*.jar >/dev/null 2>&1 || { rm -rf "$tmp"; die "no kafka_2.13 jar was fetched"; }
  echo "$want" >"$tmp/.pom.sha256"
  rm -rf "$LIBS"
  mv "$tmp" "$LIBS"
  say "jars in $LIBS ($(ls "$LIBS" | wc -l) files)"
}

# ------------------------------------------------------------------------------- processes

# Is $1 the Kafka JVM started for run dir $2? (matched by its own command line, never by name)
is_ours() {
  local pid="$1" run="$2" cmd
  [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
  [[ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != "Z" ]] || return 1
  cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline")"
  [[ "$cmd" == *" kafka.Kafka $run/server.properties"* ]]
}

running_pid() {
  local run="$1" pid
  pid="$(cat "$run/pid" 2>/dev/null || true)"
  if is_ours "$pid" "$run"; then echo "$pid"; fi
}

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

answers() {  # is something accepting TCP connections on $HOST:$1?
  (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

write_config() {
  local run="$1" port="$2" cport="$3"
  cat >"$run/server.properties" <<EOF
# written by deploy/kafka.sh: one KRaft node, broker and controller in one process
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$cport
listeners=PLAINTEXT://$HOST:$port,CONTROLLER://$HOST:$cport
advertised.listeners=PLAINTEXT://$HOST:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$run/data
# one node: every internal topic has one replica
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
default.replication.factor=1
min.insync.replicas=1
num.partitions=1
# tests join groups all the time: do not hold the first join back 3 s
group.initial.rebalance.delay.ms=0
# small machine: few threads, a small compaction buffer (the default 128 MiB would not fit the heap)
num.network.threads=2
num.io.threads=4
background.threads=4
log.cleaner.threads=1
log.cleaner.dedupe.buffer.size=8388608
num.recovery.threads.per.data.dir=1
EOF
}

stop_run() {  # stop the broker (and its watcher) of run dir $1; wait up to $2 s before SIGKILL
  local run="$1" timeout="$2" pid wpid i
  wpid="$(cat "$run/watcher.pid" 2>/dev/null || true)"
  if [[ -n "$wpid" && "$wpid" != "$$" && -r "/proc/$wpid/cmdline" ]] \
     && tr '\0' ' ' <"/proc/$wpid/cmdline" | grep -q "kafka.sh __watch $run "; then
    kill -TERM "$wpid" 2>/dev/null || true
  fi
  rm -f "$run/watcher.pid"
  pid="$(running_pid "$run")"
  if [[ -z "$pid" ]]; then
    rm -f "$run/pid"
    return 1
  fi
  kill -TERM "$pid" 2>/dev/null || true
  kill -CONT "$pid" 2>/dev/null || true  # a paused (SIGSTOP) JVM cannot act on TERM
  for ((i = 0; i < timeout * 10; i++)); do
    is_ours "$pid" "$run" || break
    sleep 0.1
  done
  if is_ours "$pid" "$run"; then
    say "pid $pid still running after ${timeout}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do is_ours "$pid" "$run" || break; sleep 0.1; done
  fi
  rm -f "$run/pid"
  return 0
}

# ------------------------------------------------------------------------------------ start

launch() {  # format (unless kept) and start; sets LAUNCHED_PID
  local run="$1" keep="$2" cluster_id
  if [[ "$keep" == 0 ]]; then
    rm -rf "$run/data"
    # a cluster id is 16 random bytes, base64url without padding (what `random-uuid` prints)
    cluster_id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    if ! "$JAVA" -Xmx128m -Dlog4j2.configurationFile="file:$CONF/log4j2.properties" \
         -cp "$LIBS/*" kafka.tools.StorageTool format --cluster-id "$cluster_id" \
         --config "$run/server.properties" >>"$run/kafka.log" 2>&1; then
      tail -n 20 "$run/kafka.log" >&2
      die "formatting KRaft storage failed (log: $run/kafka.log)"
    fi
  fi
  # setsid: its own session, so a Ctrl-C meant for the caller's terminal does not reach it
  setsid "$JAVA" "-Xmx$HEAP" "-Xms$HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="file:$CONF/log4j2.properties" \
    -cp "$LIBS/*" kafka.Kafka "$run/server.properties" \
    </dev/null >>"$run/kafka.log" 2>&1 &
  LAUNCHED_PID=$!
}

wait_ready() {  # until the node logs "started" and its port accepts; 0 ready, 1 exited, 2 timeout
  local run="$1" pid="$2" port="$3" timeout="$4" deadline
  deadline=$((SECONDS + timeout))
  while :; do
    is_ours "$pid" "$run" || return 1
    if grep -q "Kafka Server started" "$run/kafka.log" 2>/dev/null && answers "$port"; then
      return 0
    fi
    ((SECONDS < deadline)) || return 2
    sleep 0.2
  done
}

start() {
  local run="$1" port="" keep="$3" watch="$4" timeout="$5" pid cport attempt rc start_s
  command -v "$JAVA" >/dev/null 2>&1 || die "no Java: install OpenJDK 17 (Debian: apt-get install openjdk-17-jre-headless)"
  mkdir -p "$run"
  run="$(cd "$run" && pwd)"
  pid="$(running_pid "$run")"
  if [[ -n "$pid" ]]; then
    say "already running (pid $pid)"
    cat "$run/bootstrap"
    return 0
  fi
  fetch
  start_s=$SECONDS
  for attempt in 1 2 3; do
    if [[ "$keep" == 1 && -f "$run/server.properties" && -f "$run/data/meta.properties" ]]; then
      port="$(sed -n 's/^advertised.listeners=PLAINTEXT:\/\/.*:\([0-9]*\)$/\1/p' "$run/server.properties")"
    else
      keep=0
      port="${port_arg:-$(free_port)}"
      cport="$(free_port)"
      while [[ "$cport" == "$port" ]]; do cport="$(free_port)"; done
      write_config "$run" "$port" "$cport"
    fi
    : >"$run/kafka.log"
    launch "$run" "$keep"
    pid="$LAUNCHED_PID"
    echo "$pid" >"$run/pid"
    echo "$HOST:$port" >"$run/bootstrap"
    rc=0
    wait_ready "$run" "$pid" "$port" "$timeout" || rc=$?
    if [[ "$rc" == 0 ]]; then
      break
    fi
    if [[ "$rc" == 1 ]] && grep -q "Address already in use" "$run/kafka.log" && [[ -z "$port_arg" && "$keep" == 0 ]]; then
      say "a port was taken between probe and bind; trying other ports"
      rm -f "$run/pid"
      continue
    fi
    tail -n 30 "$run/kafka.log" >&2
    stop_run "$run" 5 || true
    [[ "$rc" == 1 ]] && die "the broker exited (log: $run/kafka.log)"
    die "the broker did not answer within ${timeout}s (log: $run/kafka.log)"
  done
  [[ "$rc" == 0 ]] || die "could not find free ports"
  if [[ -n "$watch" ]]; then
    setsid bash "$SELF" __watch "$run" "$watch" </dev/null >/dev/null 2>&1 &
    echo $! >"$run/watcher.pid"
  fi
  say "Kafka $(ls "$LIBS" | sed -n 's/^kafka_2.13-\(.*\)\.jar$/\1/p') up in $((SECONDS - start_s))s: pid $pid, log $run/kafka.log"
  cat "$run/bootstrap"
}

# ------------------------------------------------------------------------------------- main

cmd="${1:-}"
[[ -n "$cmd" ]] || usage
shift
run_dir="$HOME_DIR/run"
port_arg=""
keep=0
watch=""
timeout=""
while (($#)); do
  case "$1" in
    --run-dir) run_dir="$2"; shift 2 ;;
    --port) port_arg="$2"; shift 2 ;;
    --keep-data) keep=1; shift ;;
    --watch-pid) watch="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) [[ "$cmd" == __watch ]] && break; say "unknown option: $1"; usage ;;
  esac
done

case "$cmd" in
  fetch)
    fetch
    echo "$LIBS"
    ;;
  start)
    start "$run_dir" "$port_arg" "$keep" "$watch" "${timeout:-90}"
    ;;
  stop)
    mkdir -p "$run_dir"
    run_dir="$(cd "$run_dir" && pwd)"
    if stop_run "$run_dir" "${timeout:-30}"; then say "stopped"; else say "not running"; fi
    ;;
  status)
    [[ -d "$run_dir" ]] || { say "not running"; exit 1; }
    run_dir="$(cd "$run_dir" && pwd)"
    pid="$(running_pid "$run_dir")"
    [[ -n "$pid" ]] || { say "not running"; exit 1; }
    bootstrap="$(cat "$run_dir/bootstrap")"
    answers "${bootstrap##*:}" || { say "pid $pid does not answer on $bootstrap"; echo "$bootstrap"; exit 1; }
    echo "$bootstrap"
    ;;
  __watch)  # internal: __watch RUN_DIR PID — stop RUN_DIR's broker once PID is gone
    run_dir="$1"; parent="$2"
    while kill -0 "$parent" 2>/dev/null && [[ -n "$(running_pid "$run_dir")" ]]; do sleep 1; done
    rm -f "$run_dir/watcher.pid"
    stop_run "$run_dir" 10 >/dev/null 2>&1 || true
    ;;
  *)
    usage
    ;;
esac
