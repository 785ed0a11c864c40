#!/usr/bin/env bash
# The standard benchmark suite: builds in release mode, starts fresh local 3-node clusters,
# measures, and writes the results (medians of BENCH_RUNS runs, default 3) with the machine
# description and the exact commands into docs/BENCHMARKS.md, between the bench markers.
#
#   sequential   1 connection, 1 in flight: the latency floor
#   throughput   200-byte messages, 64 rooms, enough connections x in-flight to saturate;
#                peak RSS of each node during it
#   fan-out      1,000 msgs/s with 50 subscribers on other nodes than the sender
#   failover     kill -9 of a shard leader until writes to that shard succeed again (5 kills),
#                with the writing client connected to another node, then to the killed one
#   idle         CPU of each node with 256 shards and no traffic, over 30 s
#   catch-up     a node down while 100k messages are written: time until it serves the same history
#   flood        one user floods a node (rate limits on) while another sends 20 msgs/s through it
#   presence     10,000 users over the 3 nodes, each watching 50 others, a change per user per 2 min:
#                watcher latency across nodes, CPU and memory of each node
#
# Every connection signs in (a bench user, and users of its own for the load); rate limits are
# off except for the flood benchmark.
#
# Usage: scripts/bench.sh [--no-write]   (--no-write: print the results, leave the docs alone)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/system-deps.sh
ensure_build_deps
ensure_packages python3

WRITE=1
[ "${1:-}" = "--no-write" ] && WRITE=0
RUNS=${BENCH_RUNS:-3}
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
BIN="$TARGET/release"
export CHORUS_CLUSTER_DIR="${BENCH_CLUSTER_DIR:-$TARGET/bench/cluster}"
OUT="$TARGET/bench"
mkdir -p "$OUT"

cargo build --release --locked -p chorus-server -p chorus-client --bins
# The bench signs in as a user of its own, kept apart from the user's own profiles.
export XDG_CONFIG_HOME="$OUT/config" CHORUS_PROFILE=bench
chorus() { "$BIN/chorus" "$@"; }
# Rate limits measure abuse, not throughput: off, except for the flood benchmark.
NO_LIMITS="--rate-sends-per-user 0 --rate-requests-per-connection 0 --rate-registrations-per-address 0 --rate-rooms-per-user 0"
fresh() { # fresh cluster with the given extra node flags, and the bench user signed in
  scripts/cluster.sh reset >/dev/null 2>&1 || true
  rm -rf "$XDG_CONFIG_HOME/chorus/sessions"
  CHORUS_NODE_ARGS="$*" scripts/cluster.sh up >/dev/null
  chorus register bench-runner --password-stdin <<<"bench-runner-password" >/dev/null
}
median() { python3 -c 'import sys,statistics; v=[float(x) for x in sys.argv[1:]]; print(statistics.median(v))' "$@"; }
field() { python3 -c 'import sys,json; d=json.load(sys.stdin); print(eval("d"+sys.argv[1]))' "$1"; }
pid_of() { cat "$CHORUS_CLUSTER_DIR/run/node-$1.pid"; }
results=()
say() { echo "bench: $*" >&2; }

# --- sequential -------------------------------------------------------------------------------
fresh $NO_LIMITS
SEQ_CMD="chorus bench --connections 1 --inflight 1 --rooms 1 --duration 10s"
p50=(); p99=(); rate=()
for _ in $(seq "$RUNS"); do
  j=$(chorus --json bench --connections 1 --inflight 1 --rooms 1 --duration 10s)
  p50+=("$(field '["ack"]["p50_us"]' <<<"$j")"); p99+=("$(field '["ack"]["p99_us"]' <<<"$j")")
  rate+=("$(field '["msgs_per_s"]' <<<"$j")")
done
SEQ_P50=$(median "${p50[@]}"); SEQ_P99=$(median "${p99[@]}"); SEQ_RATE=$(median "${rate[@]}")
say "sequential: p50 ${SEQ_P50} µs, p99 ${SEQ_P99} µs, ${SEQ_RATE} msgs/s"

# --- throughput and memory --------------------------------------------------------------------
# 8 × 256 in flight: entries grow with what is queued per shard, and 8 × 64 left throughput on
# the table (about half the rate in alternating runs; docs/BENCHMARKS.md).
TP_CMD="chorus bench --connections 8 --inflight 256 --size 200 --rooms 64 --duration 20s"
rate=(); mbs=(); p50=(); p99=()
for _ in $(seq "$RUNS"); do
  j=$(chorus --json bench --connections 8 --inflight 256 --size 200 --rooms 64 --duration 20s)
  rate+=("$(field '["msgs_per_s"]' <<<"$j")"); mbs+=("$(field '["mb_per_s"]' <<<"$j")")
  p50+=("$(field '["ack"]["p50_us"]' <<<"$j")"); p99+=("$(field '["ack"]["p99_us"]' <<<"$j")")
done
TP_RATE=$(median "${rate[@]}"); TP_MBS=$(median "${mbs[@]}"); TP_P50=$(median "${p50[@]}"); TP_P99=$(median "${p99[@]}")
RSS=""
for i in 1 2 3; do
  RSS+="$(awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$(pid_of "$i")/status") "
done
RSS_MAX=$(tr ' ' '\n' <<<"$RSS" | sort -n | tail -1)
say "throughput: ${TP_RATE} msgs/s (${TP_MBS} MB/s), p50 ${TP_P50} µs, p99 ${TP_P99} µs; peak RSS per node (MiB): $RSS"

# --- fan-out ----------------------------------------------------------------------------------
FO_CMD="chorus bench --rate 1000 --subscribers 50 --connections 4 --inflight 8 --rooms 8 --duration 15s"
p50=(); p99=()
for _ in $(seq "$RUNS"); do
  j=$(chorus --json bench --rate 1000 --subscribers 50 --connections 4 --inflight 8 --rooms 8 --duration 15s)
  p50+=("$(field '["fanout"]["p50_us"]' <<<"$j")"); p99+=("$(field '["fanout"]["p99_us"]' <<<"$j")")
done
FO_P50=$(median "${p50[@]}"); FO_P99=$(median "${p99[@]}")
say "fan-out: p50 ${FO_P50} µs, p99 ${FO_P99} µs"

# --- failover ---------------------------------------------------------------------------------
FAIL_CMD="chorus bench failover --kills 5 --kill-cmd 'scripts/cluster.sh kill {node}' --restart-cmd 'scripts/cluster.sh restart {node}'"
j=$(chorus --json bench failover --kills 5 --kill-cmd "scripts/cluster.sh kill {node}" \
      --restart-cmd "scripts/cluster.sh restart {node}")
FAIL_P50=$(field '["p50_ms"]' <<<"$j"); FAIL_ALL=$(field '["failover_ms"]' <<<"$j")
say "failover: p50 ${FAIL_P50} ms ($FAIL_ALL)"
# The same with the probe connected to the node that is killed: the client must also notice
# that its connection is dead (the QUIC idle timeout) and reconnect to another node.
FAILC_CMD="chorus bench failover --client-on-leader --kills 5 --kill-cmd 'scripts/cluster.sh kill {node}' --restart-cmd 'scripts/cluster.sh restart {node}'"
j=$(chorus --json bench failover --client-on-leader --kills 5 --kill-cmd "scripts/cluster.sh kill {node}" \
      --restart-cmd "scripts/cluster.sh restart {node}")
FAILC_P50=$(field '["p50_ms"]' <<<"$j"); FAILC_ALL=$(field '["failover_ms"]' <<<"$j")
say "failover, client on the killed node: p50 ${FAILC_P50} ms ($FAILC_ALL)"
# And delivery to a client that only subscribes, on the node that is killed.
FAILS_CMD="chorus bench failover --subscriber-on-leader --kills 5 --kill-cmd 'scripts/cluster.sh kill {node}' --restart-cmd 'scripts/cluster.sh restart {node}'"
j=$(chorus --json bench failover --subscriber-on-leader --kills 5 --kill-cmd "scripts/cluster.sh kill {node}" \
      --restart-cmd "scripts/cluster.sh restart {node}")
FAILS_P50=$(field '["p50_ms"]' <<<"$j"); FAILS_ALL=$(field '["failover_ms"]' <<<"$j")
say "failover, subscriber on the killed node: p50 ${FAILS_P50} ms ($FAILS_ALL)"

# --- abuse limits: one user's flood beside another user, on one node -----------------------------
fresh
FL_CMD="chorus bench flood --rate 20 --duration 20s --connections 4 --inflight 64"
alone=(); flooded=(); ratio=()
for _ in $(seq "$RUNS"); do
  j=$(chorus --json bench flood --rate 20 --duration 20s --connections 4 --inflight 64)
  alone+=("$(field '["alone"]["p99_us"]' <<<"$j")"); flooded+=("$(field '["flooded"]["p99_us"]' <<<"$j")")
  ratio+=("$(field '["p99_ratio"]' <<<"$j")")
done
FL_ALONE=$(median "${alone[@]}"); FL_FLOODED=$(median "${flooded[@]}"); FL_RATIO=$(median "${ratio[@]}")
say "flood: victim p99 ${FL_ALONE} µs alone, ${FL_FLOODED} µs flooded (${FL_RATIO}×)"

# --- catch-up ---------------------------------------------------------------------------------
fresh $NO_LIMITS
CU_CMD="kill node 3; chorus bench --count 100000 --connections 8 --inflight 64 --rooms 64; restart node 3"
scripts/cluster.sh kill 3 >/dev/null
chorus --nodes 127.0.0.1:7401,127.0.0.1:7402 bench --count 100000 --connections 8 --inflight 64 --rooms 64 >/dev/null
start=$(date +%s.%N)
scripts/cluster.sh restart 3 >/dev/null
until chorus --json status 2>/dev/null | python3 -c '
import sys, json
s = json.load(sys.stdin)
ok = all(n["reachable"] for n in s["nodes"]) and all(
    sh["leader"] and all(r["applied"] >= sh["committed"] for r in sh["replica_status"] if r["node"] == 3)
    for sh in s["shards"])
sys.exit(0 if ok else 1)'; do sleep 0.2; done
end=$(date +%s.%N)
CU_S=$(python3 -c "print(round($end - $start, 1))")
same=$(diff <(chorus --nodes 127.0.0.1:7403 --json rooms --limit 1000 | python3 -c 'import sys,json; [print(json.loads(l)["room"], json.loads(l)["last_seq"]) for l in sys.stdin]') \
            <(chorus --nodes 127.0.0.1:7401 --json rooms --limit 1000 | python3 -c 'import sys,json; [print(json.loads(l)["room"], json.loads(l)["last_seq"]) for l in sys.stdin]') \
       >/dev/null && echo identical || echo DIFFERENT)
say "catch-up: ${CU_S} s after restart; node 3's rooms vs node 1's: $same"

# --- idle cost with 256 shards ----------------------------------------------------------------
fresh --shard-count 256 $NO_LIMITS
sleep 10
ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$(pid_of "$1")/stat"; }
before=(); for i in 1 2 3; do before+=("$(cpu "$i")"); done
sleep 30
IDLE=""
for i in 1 2 3; do
  after=$(cpu "$i")
  IDLE+="$(python3 -c "print(round(100.0 * ($after - ${before[$((i - 1))]}) / $ticks / 30, 2))") "
done
IDLE_MAX=$(tr ' ' '\n' <<<"$IDLE" | sort -n | tail -1)
say "idle, 256 shards: CPU % of one core per node: $IDLE"
scripts/cluster.sh reset >/dev/null

# --- presence: 10,000 users, each watching 50 ----------------------------------------------------
# Users sign in through an identity provider whose key the bench holds (no 10,000 password
# hashes); each connection is a UDP socket of the bench process, hence the file limit. A client
# may dial a second node while its first handshake is slow, so nodes allow 12,000 connections.
ensure_packages openssl
OIDC_DIR="$OUT/presence-oidc"; mkdir -p "$OIDC_DIR"; chmod 700 "$OIDC_DIR"
[ -f "$OIDC_DIR/key.der" ] || openssl genpkey -algorithm ed25519 -outform DER -out "$OIDC_DIR/key.der"
X=$(openssl pkey -inform DER -in "$OIDC_DIR/key.der" -pubout -outform DER | tail -c 32 | base64 -w0 | tr '+/' '-_' | tr -d '=')
echo "{\"keys\":[{\"kty\":\"OKP\",\"crv\":\"Ed25519\",\"kid\":\"bench\",\"x\":\"$X\"}]}" > "$OIDC_DIR/jwks.json"
PR_OIDC="--oidc-issuer https://bench.invalid --oidc-audience chorus-bench --oidc-jwks $OIDC_DIR/jwks.json"
PR_CMD="chorus bench presence --users 10000 --watch 50 --change-every 2min --duration 60s"
other50=(); other99=(); cpu=(); mem=()
for _ in $(seq "$RUNS"); do
  fresh --max-connections 12000 $NO_LIMITS $PR_OIDC
  pids="$(pid_of 1),$(pid_of 2),$(pid_of 3)"
  j=$( (ulimit -n "$(ulimit -Hn)"; chorus --json --nodes 127.0.0.1:7401,127.0.0.1:7402,127.0.0.1:7403 bench presence \
        --users 10000 --watch 50 --change-every 2min --duration 60s --oidc-key "$OIDC_DIR/key.der" \
        --oidc-issuer https://bench.invalid --oidc-audience chorus-bench --node-pids "$pids") )
  other50+=("$(field '["other_node"]["p50_us"]' <<<"$j")"); other99+=("$(field '["other_node"]["p99_us"]' <<<"$j")")
  cpu+=("$(python3 -c 'import sys,json; print(max(n["cpu_percent"] for n in json.load(sys.stdin)["nodes"]))' <<<"$j")")
  mem+=("$(python3 -c 'import sys,json; print(max(n["rss_end_mib"] - n["rss_idle_mib"] for n in json.load(sys.stdin)["nodes"]))' <<<"$j")")
done
PR_P50=$(median "${other50[@]}"); PR_P99=$(median "${other99[@]}"); PR_CPU=$(median "${cpu[@]}"); PR_MEM=$(median "${mem[@]}")
say "presence: seen on another node p50 ${PR_P50} µs, p99 ${PR_P99} µs; busiest node ${PR_CPU}% of a core, +${PR_MEM} MiB"

# --- report -----------------------------------------------------------------------------------
MACHINE="$(nproc) vCPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, Linux $(uname -r)"
verdict() { python3 -c "print('met' if $1 else 'not met')"; }
REPORT=$(cat <<EOF
Measured $(date -u +%Y-%m-%d) by \`scripts/bench.sh\` on $MACHINE: three nodes and the load
generator on this one machine, release build, every acknowledgement fsync'd on a majority.
Medians of $RUNS runs where several were made.

| benchmark | result | target | | command |
|---|---|---|---|---|
| sequential | p50 $(printf %.2f "$(python3 -c "print($SEQ_P50/1000)")") ms, p99 $(printf %.2f "$(python3 -c "print($SEQ_P99/1000)")") ms ($(printf %.0f "$SEQ_RATE") msgs/s) | p50 ≤ 1.5 ms | $(verdict "$SEQ_P50 <= 1500") | \`$SEQ_CMD\` |
| throughput | $(printf %.0f "$TP_RATE") msgs/s, $(printf %.1f "$TP_MBS") MB/s; ack p50 $(printf %.1f "$(python3 -c "print($TP_P50/1000)")") ms, p99 $(printf %.1f "$(python3 -c "print($TP_P99/1000)")") ms | ≥ 50,000 msgs/s | $(verdict "$TP_RATE >= 50000") | \`$TP_CMD\` |
| peak RSS per node (throughput run) | ${RSS% } MiB | ≤ 500 MiB | $(verdict "$RSS_MAX <= 500") | VmHWM of each chorusd |
| fan-out, 1,000 msgs/s, 50 subscribers | p50 $(printf %.2f "$(python3 -c "print($FO_P50/1000)")") ms, p99 $(printf %.2f "$(python3 -c "print($FO_P99/1000)")") ms | p99 ≤ 10 ms | $(verdict "$FO_P99 <= 10000") | \`$FO_CMD\` |
| leader failover (5 kills) | p50 ${FAIL_P50} ms (all: ${FAIL_ALL}) | p50 ≤ 1 s | $(verdict "$FAIL_P50 <= 1000") | \`$FAIL_CMD\` |
| leader failover, client connected to the killed leader (5 kills) | p50 ${FAILC_P50} ms (all: ${FAILC_ALL}) | | | \`$FAILC_CMD\` |
| leader failover, delivery to a subscriber connected to the killed leader (5 kills) | p50 ${FAILS_P50} ms (all: ${FAILS_ALL}) | | | \`$FAILS_CMD\` |
| idle, 256 shards, 30 s | ${IDLE% } % of one core per node | ≤ 3 % | $(verdict "$IDLE_MAX <= 3") | \`CHORUS_NODE_ARGS="--shard-count 256" scripts/cluster.sh up\`, CPU from /proc |
| catch-up, 100k messages | ${CU_S} s after restart; history $same | | | \`$CU_CMD\` |
| presence: 10,000 users over 3 nodes, each watching 50, a change per user per 2 min | a change seen on another node: p50 $(printf %.0f "$(python3 -c "print($PR_P50/1000)")") ms, p99 $(printf %.0f "$(python3 -c "print($PR_P99/1000)")") ms; busiest node $(printf %.1f "$PR_CPU") % of a core, +$(printf %.0f "$PR_MEM") MiB over idle | p99 ≤ 2 s, ≤ 10 %, ≤ 200 MiB | $(verdict "$PR_P99 <= 2000000 and $PR_CPU <= 10 and $PR_MEM <= 200") | \`$PR_CMD\` (users sign in with an identity provider's tokens) |
| one user flooding a node (default rate limits), another at 20 msgs/s | the other's ack p99 $(printf %.1f "$(python3 -c "print($FL_ALONE/1000)")") ms alone, $(printf %.1f "$(python3 -c "print($FL_FLOODED/1000)")") ms during the flood ($(printf %.2f "$FL_RATIO")×) | ≤ 2× | $(verdict "$FL_RATIO <= 2") | \`$FL_CMD\` |
EOF
)
echo "$REPORT"
if [ "$WRITE" = 1 ]; then
  python3 - "$REPORT" <<'PY'
import re, sys
path = "docs/BENCHMARKS.md"
text = open(path).read()
block = "<!-- bench:begin -->\n" + sys.argv[1] + "\n<!-- bench:end -->"
if "<!-- bench:begin -->" in text:
    text = re.sub(r"<!-- bench:begin -->.*?<!-- bench:end -->", lambda _: block, text, flags=re.S)
else:
    text += "\n## The standard suite (scripts/bench.sh)\n\n" + block + "\n"
open(path, "w").write(text)
PY
  say "wrote docs/BENCHMARKS.md"
fi
