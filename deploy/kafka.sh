#!/usr/bin/env bash
# Real Apache Kafka (KRaft) on 127.0.0.1, from the broker's jars on Maven Central — no Docker, no
# tarball: one combined broker+controller node, or a cluster of N such nodes (replication factor N).
# Needs Java 17+ and Maven (`mvn`) for the fetch.
#
#   bash deploy/kafka.sh fetch                    # jars -> .kafka/libs (once; re-fetched when the pom changes)
#   bash deploy/kafka.sh start  [options]         # fetch, format, start, wait; prints host:port[,host:port...]
#   bash deploy/kafka.sh status [--run-dir DIR]   # prints the bootstrap; exit 1 when not (all) running
#   bash deploy/kafka.sh stop   [--run-dir DIR]   # SIGTERM each pid (SIGKILL after --timeout s)
#   bash deploy/kafka.sh start|stop --node I --run-dir DIR   # one node of a cluster (start: on its data)
#
# start options:
#   --run-dir DIR     state: pid, bootstrap, server.properties, kafka.log, data/ (default .kafka/run);
#                     a cluster: DIR/nodes, DIR/bootstrap and one such dir per node, DIR/node1 ...
#   --nodes N         a cluster of N combined broker+controller nodes (default 1: one node)
#   --port N          client port of a single node (default: a free one; other ports are always free ones)
#   --keep-data       reuse DIR's formatted storage and ports (a broker restart) instead of a fresh node
#   --watch-pid PID   stop the broker(s) when process PID exits (used by the test session)
#   --timeout S       seconds to wait until it answers (default 90)
# Env: BREAKWATER_KAFKA_HOME (cache, default <repo>/.kafka), BREAKWATER_KAFKA_HEAP (default 384m; 256m
#      per node of a cluster), JAVA (default java), PYTHON (picks free ports; default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$ROOT/deploy/kafka.sh"
CONF="$ROOT/deploy/kafka"
HOME_DIR="${BREAKWATER_KAFKA_HOME:-$ROOT/.kafka}"
LIBS="$HOME_DIR/libs"
HEAP="${BREAKWATER_KAFKA_HEAP:-}"
JAVA="${JAVA:-java}"
PYTHON="${PYTHON:-python3}"
HOST=127.0.0.1

say() { echo "kafka.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

usage() { sed -n '2,23p' "$SELF" | sed 's/^# \{0,1\}//' >&2; exit 2; }

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

write_config() {  # run port cport [node_id voters n]: one node's server.properties
  local run="$1" port="$2" cport="$3" id="${4:-1}" voters="${5:-1@$HOST:$3}" n="${6:-1}" isr
  isr=$(( n > 1 ? 2 : 1 ))  # a cluster: a write is acknowledged by 2 of its replicas
  cat >"$run/server.properties" <<EOF
# written by deploy/kafka.sh: KRaft node $id of $n, broker and controller in one process
process.roles=broker,controller
node.id=$id
controller.quorum.voters=$voters
listeners=PLAINTEXT://$HOST:$port,CONTROLLER://$HOST:$cport
advertised.listeners=PLAINTEXT://$HOST:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$run/data
# every internal topic and every new topic has one replica per node
offsets.topic.replication.factor=$n
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=$n
transaction.state.log.min.isr=$isr
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=$n
share.coordinator.state.topic.min.isr=$isr
default.replication.factor=$n
min.insync.replicas=$isr
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
num.replica.fetchers=1
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

new_cluster_id() {  # 16 random bytes, base64url without padding (what `random-uuid` prints)
  local id
  # never one that starts with "-": the storage tool would read it as an option (Kafka's own
  # random-uuid draws again in that case too)
  while :; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    [[ "$id" != -* ]] && break
  done
  echo "$id"
}

format_storage() {  # run cluster_id: a fresh KRaft storage dir for the node of run dir $1
  local run="$1" cluster_id="$2"
  rm -rf "$run/data"
  if ! "$JAVA" -Xmx128m -XX:TieredStopAtLevel=1 -Dlog4j2.configurationFile="file:$CONF/log4j2.properties" \
       -cp "$LIBS/*" kafka.tools.StorageTool format --cluster-id "$cluster_id" \
       --config "$run/server.properties" >>"$run/kafka.log" 2>&1; then
    tail -n 20 "$run/kafka.log" >&2
    die "formatting KRaft storage failed (log: $run/kafka.log)"
  fi
}

launch() {  # run keep: format (unless kept) and start; sets LAUNCHED_PID
  local run="$1" keep="$2" heap="${HEAP:-384m}"
  [[ -f "$run/../nodes" ]] && heap="${HEAP:-256m}"  # a node of a cluster
  [[ "$keep" == 0 ]] && format_storage "$run" "$(new_cluster_id)"
  # setsid: its own session, so a Ctrl-C meant for the caller's terminal does not reach it
  setsid "$JAVA" "-Xmx$heap" "-Xms$heap" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
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

# ---------------------------------------------------------------------------------- cluster
# DIR/nodes holds N; DIR/node<i> is node i's run dir (the same layout as a single node's run dir);
# DIR/bootstrap lists every node's client address; DIR/watch.pid the --watch-pid, for node restarts.

node_port() {  # the client port a node's server.properties advertises
  sed -n 's/^advertised.listeners=PLAINTEXT:\/\/.*:\([0-9]*\)$/\1/p' "$1/server.properties"
}

watch_node() {  # node_dir: stop it when the watched pid of its cluster exits
  local node="$1" w
  w="$(cat "$node/../watch.pid" 2>/dev/null || true)"
  if [[ -n "$w" ]]; then
    setsid bash "$SELF" __watch "$node" "$w" </dev/null >/dev/null 2>&1 &
    echo $! >"$node/watcher.pid"
  fi
}

start_cluster() {  # run n keep watch timeout
  local run="$1" n="$2" keep="$3" watch="$4" timeout="$5" i attempt rc node ports=() pids=() voters cid start_s up=0
  command -v "$JAVA" >/dev/null 2>&1 || die "no Java: install OpenJDK 17 (Debian: apt-get install openjdk-17-jre-headless)"
  ((n >= 3)) || die "--nodes: a cluster has 3 nodes or more (replication factor 3, 2 in sync)"
  mkdir -p "$run"
  run="$(cd "$run" && pwd)"
  for ((i = 1; i <= n; i++)); do
    [[ -n "$(running_pid "$run/node$i")" ]] && up=$((up + 1))
  done
  if ((up > 0)); then
    say "already running ($up of $n nodes)"
    cat "$run/bootstrap"
    return 0
  fi
  fetch
  start_s=$SECONDS
  echo "$n" >"$run/nodes"
  if [[ -n "$watch" ]]; then echo "$watch" >"$run/watch.pid"; else rm -f "$run/watch.pid"; fi
  for attempt in 1 2 3; do
    if [[ "$keep" == 1 && -f "$run/node1/data/meta.properties" ]]; then
      :
    else
      keep=0
      cid="$(new_cluster_id)"
      ports=()
      while ((${#ports[@]} < 2 * n)); do  # n client ports, then n controller ports, all distinct
        local p; p="$(free_port)"
        [[ " ${ports[*]} " == *" $p "* ]] || ports+=("$p")
      done
      voters=""
      for ((i = 1; i <= n; i++)); do voters+="${voters:+,}$i@$HOST:${ports[n + i - 1]}"; done
      for ((i = 1; i <= n; i++)); do
        mkdir -p "$run/node$i"
        write_config "$run/node$i" "${ports[i - 1]}" "${ports[n + i - 1]}" "$i" "$voters" "$n"
      done
    fi
    local boot=""
    pids=()
    for ((i = 1; i <= n; i++)); do : >"$run/node$i/kafka.log"; done
    if [[ "$keep" == 0 ]]; then  # every node's storage, in parallel, with one cluster id
      for ((i = 1; i <= n; i++)); do format_storage "$run/node$i" "$cid" & done
      for ((i = 1; i <= n; i++)); do wait -n || die "formatting KRaft storage failed"; done
    fi
    for ((i = 1; i <= n; i++)); do  # all at once: no node finishes starting before the quorum forms
      node="$run/node$i"
      launch "$node" 1
      pids+=("$LAUNCHED_PID")
      echo "$LAUNCHED_PID" >"$node/pid"
      boot+="${boot:+,}$HOST:$(node_port "$node")"
    done
    echo "$boot" >"$run/bootstrap"
    rc=0
    for ((i = 1; i <= n; i++)); do
      node="$run/node$i"
      wait_ready "$node" "${pids[i - 1]}" "$(node_port "$node")" "$timeout" || { rc=$?; break; }
    done
    [[ "$rc" == 0 ]] && break
    if [[ "$rc" == 1 && "$keep" == 0 ]] && grep -q "Address already in use" "$run"/node*/kafka.log; then
      say "a port was taken between probe and bind; trying other ports"
      for ((i = 1; i <= n; i++)); do stop_run "$run/node$i" 5 || true; done
      continue
    fi
    tail -n 30 "$node/kafka.log" >&2
    for ((i = 1; i <= n; i++)); do stop_run "$run/node$i" 5 || true; done
    [[ "$rc" == 1 ]] && die "node $i exited (log: $node/kafka.log)"
    die "node $i did not answer within ${timeout}s (log: $node/kafka.log)"
  done
  [[ "$rc" == 0 ]] || die "could not find free ports"
  for ((i = 1; i <= n; i++)); do watch_node "$run/node$i"; done
  say "Kafka $(ls "$LIBS" | sed -n 's/^kafka_2.13-\(.*\)\.jar$/\1/p') cluster of $n up in $((SECONDS - start_s))s: pids ${pids[*]}, logs $run/node*/kafka.log"
  cat "$run/bootstrap"
}

start_node() {  # run i timeout: start one stopped node of a cluster again, on its storage and ports
  local run="$1" i="$2" timeout="$3" node pid rc=0
  [[ -f "$run/nodes" && -f "$run/node$i/data/meta.properties" ]] || die "no node $i in cluster $run"
  node="$(cd "$run/node$i" && pwd)"
  pid="$(running_pid "$node")"
  if [[ -n "$pid" ]]; then
    say "node $i already running (pid $pid)"
    echo "$HOST:$(node_port "$node")"
    return 0
  fi
  : >"$node/kafka.log"
  launch "$node" 1
  pid="$LAUNCHED_PID"
  echo "$pid" >"$node/pid"
  wait_ready "$node" "$pid" "$(node_port "$node")" "$timeout" || rc=$?
  if [[ "$rc" != 0 ]]; then
    tail -n 30 "$node/kafka.log" >&2
    stop_run "$node" 5 || true
    die "node $i did not come back (log: $node/kafka.log)"
  fi
  watch_node "$node"
  say "node $i up again: pid $pid"
  echo "$HOST:$(node_port "$node")"
}

cluster_nodes() { cat "$1/nodes" 2>/dev/null || echo 0; }

# ------------------------------------------------------------------------------------- main

cmd="${1:-}"
[[ -n "$cmd" ]] || usage
shift
run_dir="$HOME_DIR/run"
port_arg=""
keep=0
watch=""
timeout=""
nodes=1
node=""
while (($#)); do
  case "$1" in
    --run-dir) run_dir="$2"; shift 2 ;;
    --port) port_arg="$2"; shift 2 ;;
    --keep-data) keep=1; shift ;;
    --watch-pid) watch="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    --nodes) nodes="$2"; shift 2 ;;
    --node) node="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) [[ "$cmd" == __watch ]] && break; say "unknown option: $1"; usage ;;
  esac
done
[[ "$nodes" =~ ^[0-9]+$ && ( -z "$node" || "$node" =~ ^[0-9]+$ ) ]] || { say "--nodes/--node: a number"; usage; }

case "$cmd" in
  fetch)
    fetch
    echo "$LIBS"
    ;;
  start)
    if [[ -n "$node" ]]; then
      [[ -d "$run_dir" ]] || die "no cluster in $run_dir"
      start_node "$(cd "$run_dir" && pwd)" "$node" "${timeout:-90}"
    elif ((nodes > 1)); then
      start_cluster "$run_dir" "$nodes" "$keep" "$watch" "${timeout:-90}"
    else
      start "$run_dir" "$port_arg" "$keep" "$watch" "${timeout:-90}"
    fi
    ;;
  stop)
    mkdir -p "$run_dir"
    run_dir="$(cd "$run_dir" && pwd)"
    n="$(cluster_nodes "$run_dir")"
    if [[ -n "$node" ]]; then
      ((n > 0 && node >= 1 && node <= n)) || die "no node $node in cluster $run_dir"
      if stop_run "$run_dir/node$node" "${timeout:-30}"; then say "node $node stopped"; else say "node $node not running"; fi
    elif ((n > 0)); then
      stopped=0
      for ((i = 1; i <= n; i++)); do  # together: a lone node waits on a quorum that is gone
        stop_run "$run_dir/node$i" "${timeout:-30}" & 
      done
      for ((i = 1; i <= n; i++)); do wait -n && stopped=$((stopped + 1)) || true; done
      say "stopped $stopped of $n nodes"
      rm -f "$run_dir/watch.pid"
    else
      if stop_run "$run_dir" "${timeout:-30}"; then say "stopped"; else say "not running"; fi
    fi
    ;;
  status)
    [[ -d "$run_dir" ]] || { say "not running"; exit 1; }
    run_dir="$(cd "$run_dir" && pwd)"
    n="$(cluster_nodes "$run_dir")"
    if ((n > 0)); then
      down=""
      for ((i = 1; i <= n; i++)); do
        pid="$(running_pid "$run_dir/node$i")"
        if [[ -n "$pid" ]] && answers "$(node_port "$run_dir/node$i")"; then
          say "node $i: pid $pid, $HOST:$(node_port "$run_dir/node$i")"
        else
          say "node $i: not running"; down+=" $i"
        fi
      done
      cat "$run_dir/bootstrap"
      [[ -z "$down" ]] || exit 1
      exit 0
    fi
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
