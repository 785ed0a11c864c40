#!/usr/bin/env bash
# A local Chorus cluster on loopback (release build), with its data, logs and TLS certificate
# under one directory: $CHORUS_CLUSTER_DIR (default ~/.local/share/chorus/cluster).
#
#   scripts/cluster.sh up [3|5]     build, start the nodes, wait for every shard to have a leader
#   scripts/cluster.sh down         stop every node (SIGTERM, then SIGKILL after 20 s)
#   scripts/cluster.sh reset        stop, and delete the cluster's data
#   scripts/cluster.sh status       the cluster table (chorus status)
#   scripts/cluster.sh kill N       kill -9 node N
#   scripts/cluster.sh stop N       SIGTERM node N
#   scripts/cluster.sh restart N    (re)start node N with its data
#   scripts/cluster.sh logs N       follow node N's log
#
# Node N listens for clients on 127.0.0.1:740N (QUIC) and for peers on 127.0.0.1:730N (gRPC,
# mutual TLS with the cluster CA in $DIR/ca). Registration is open: anyone can `chorus register`.
# The first admin's password is in $DIR/node-1/admin-credentials.
# CHORUS_NODE_ARGS adds chorusd flags to every node (e.g. "--shard-count 256" before 'up').
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/system-deps.sh

DIR="${CHORUS_CLUSTER_DIR:-$HOME/.local/share/chorus/cluster}"
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
# CHORUS_BIN_DIR: run these chorusd and chorus binaries instead of building (e.g. to compare
# two builds).
BIN="${CHORUS_BIN_DIR:-$TARGET/release}"
export CHORUS_CLUSTER_DIR="$DIR"

die() { echo "cluster.sh: $*" >&2; exit 1; }

size() { cat "$DIR/size" 2>/dev/null || echo 0; }
pidfile() { echo "$DIR/run/node-$1.pid"; }

# A process is alive until it exits: a zombie waiting for its (re)parent to reap it is not
# (some init processes reap only every second or so).
alive() {
  local state
  state=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

running() {
  local pid
  pid=$(cat "$(pidfile "$1")" 2>/dev/null) || return 1
  alive "$pid"
}

initial_cluster() {
  local n=$1 out="" i
  for i in $(seq 1 "$n"); do out+="${out:+,}$i=127.0.0.1:$((7300 + i))"; done
  echo "$out"
}

build() {
  ensure_build_deps
  echo "cluster.sh: building chorusd and chorus (release; the first build compiles RocksDB and takes a while)" >&2
  cargo build --release --locked -p chorus-server -p chorus-client --bins
}

start_node() {
  local i=$1 n
  n=$(size)
  [ "$n" -gt 0 ] || die "no cluster in $DIR: run 'scripts/cluster.sh up' first"
  [ "$i" -ge 1 ] && [ "$i" -le "$n" ] || die "node $i is not in this $n-node cluster"
  running "$i" && { echo "node $i is already running"; return 0; }
  [ -x "$BIN/chorusd" ] || build
  mkdir -p "$DIR/logs" "$DIR/run"
  nohup "$BIN/chorusd" \
    --node-id "$i" \
    --data-dir "$DIR/node-$i" \
    --client-addr "127.0.0.1:$((7400 + i))" \
    --peer-addr "127.0.0.1:$((7300 + i))" \
    --web-addr "127.0.0.1:$((7500 + i))" \
    --initial-cluster "$(initial_cluster "$n")" \
    --tls-cert "$DIR/tls/cert.pem" --tls-key "$DIR/tls/key.pem" \
    --peer-ca-dir "$DIR/ca" \
    $(cat "$DIR/node-args" 2>/dev/null) \
    >>"$DIR/logs/node-$i.log" 2>&1 </dev/null &
  echo $! >"$(pidfile "$i")"
  echo "started node $i (pid $!, log $DIR/logs/node-$i.log)"
}

stop_node() {
  local i=$1 signal=${2:-TERM} pid
  running "$i" || { echo "node $i is not running"; return 0; }
  pid=$(cat "$(pidfile "$i")")
  kill "-$signal" "$pid"
  for _ in $(seq 1 200); do
    alive "$pid" || { rm -f "$(pidfile "$i")"; echo "node $i stopped ($signal)"; return 0; }
    sleep 0.02
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$(pidfile "$i")"
  echo "node $i did not stop within 20 s: killed"
}

wait_ready() {
  local deadline=$((SECONDS + 90)) i
  until "$BIN/chorus" status --json 2>/dev/null | grep -q '"shards"' &&
    ! "$BIN/chorus" status --json 2>/dev/null | grep -q '"leader":0'; do
    for i in $(seq 1 "$(size)"); do
      if [ -f "$(pidfile "$i")" ] && ! running "$i"; then
        tail -n 5 "$DIR/logs/node-$i.log" >&2
        die "node $i exited (log above; is another cluster using port $((7400 + i)) or $((7300 + i))?)"
      fi
    done
    [ $SECONDS -lt $deadline ] || die "the cluster has no leader for every shard after 90 s; see $DIR/logs/"
    sleep 0.5
  done
}

up() {
  local n=${1:-3} existing
  [ "$n" = 3 ] || [ "$n" = 5 ] || die "cluster size must be 3 or 5, not $n"
  existing=$(size)
  if [ "$existing" -gt 0 ] && [ "$existing" != "$n" ]; then
    die "$DIR holds a $existing-node cluster; 'scripts/cluster.sh reset' first to make a $n-node one"
  fi
  [ -n "${CHORUS_BIN_DIR:-}" ] || build
  mkdir -p "$DIR/logs" "$DIR/run"
  echo "$n" >"$DIR/size"
  # Settings every node of this cluster keeps across restarts: open registration, so that a
  # newcomer can register and chat at once (unless CHORUS_NODE_ARGS says otherwise).
  if [ ! -f "$DIR/node-args" ]; then
    local args="${CHORUS_NODE_ARGS:-}"
    case " $args " in *" --registration "*) ;; *) args="--registration open $args" ;; esac
    echo "$args" >"$DIR/node-args"
  fi
  if [ ! -f "$DIR/tls/cert.pem" ]; then
    "$BIN/chorusd" gen-cert --out "$DIR/tls" --san localhost --san 127.0.0.1 >/dev/null
  fi
  # The cluster's CA: each node issues its own peer certificate from it at first start.
  if [ ! -f "$DIR/ca/ca.pem" ]; then
    "$BIN/chorusd" ca init --dir "$DIR/ca" 2>/dev/null
  fi
  local fingerprint nodes="" i
  fingerprint=$(tr -d '[:space:]' <"$DIR/tls/fingerprint")
  for i in $(seq 1 "$n"); do nodes+="${nodes:+, }\"127.0.0.1:$((7400 + i))\""; done
  cat >"$DIR/client.toml" <<EOF
# Written by scripts/cluster.sh: how the chorus CLI reaches this local cluster.
nodes = [$nodes]
fingerprints = ["$fingerprint"]
EOF
  for i in $(seq 1 "$n"); do start_node "$i"; done
  wait_ready
  cat <<EOF

Chorus is up: $n nodes, clients on 127.0.0.1:7401..740$n (QUIC), data in $DIR.
Certificate fingerprint (SHA-256): $fingerprint

Chat from two terminals (the chorus CLI finds this cluster through $DIR/client.toml);
register once per person, then chat (each --profile keeps its own sign-in):
  $BIN/chorus register ann && $BIN/chorus chat general
  $BIN/chorus --profile bob register bob && $BIN/chorus --profile bob chat general

Or one command at a time:
  $BIN/chorus send general "hello" --create
  $BIN/chorus history general
  $BIN/chorus create plans --private && $BIN/chorus invite plans bob
  $BIN/chorus dm bob "hi"
  $BIN/chorus status

The first admin's password: $DIR/node-1/admin-credentials (chorus --profile admin login admin).

Stop it with: scripts/cluster.sh down
EOF
}

cmd=${1:-}
shift || true
case "$cmd" in
  up) up "$@" ;;
  down)
    n=$(size)
    for i in $(seq 1 "$n"); do stop_node "$i"; done
    ;;
  reset)
    n=$(size)
    for i in $(seq 1 "$n"); do stop_node "$i"; done
    rm -rf "$DIR"
    echo "removed $DIR"
    ;;
  status) "$BIN/chorus" status "$@" ;;
  kill) [ $# -eq 1 ] || die "usage: cluster.sh kill N"; stop_node "$1" KILL ;;
  stop) [ $# -eq 1 ] || die "usage: cluster.sh stop N"; stop_node "$1" TERM ;;
  restart)
    [ $# -eq 1 ] || die "usage: cluster.sh restart N"
    stop_node "$1" TERM
    start_node "$1"
    ;;
  logs) [ $# -eq 1 ] || die "usage: cluster.sh logs N"; tail -n 50 -f "$DIR/logs/node-$1.log" ;;
  *) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
