#!/usr/bin/env bash
# Before/after comparison of two builds, as docs/BENCHMARKS.md asks for: alternating runs in one
# sitting, each on a fresh local 3-node cluster (scripts/cluster.sh), rate limits off.
#
#   scripts/ab-bench.sh OLD_BIN_DIR NEW_BIN_DIR
#
# Each *_BIN_DIR holds a release `chorusd` and `chorus` (copy them out of target/release after
# building each tree). Per round and build: the throughput bench (and peak RSS of each node),
# then, on another fresh cluster, the sequential bench. ROUNDS (default 3) rounds; prints one
# line per run, then the medians. Work files go to AB_DIR (default /tmp/chorus-ab).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 OLD_BIN_DIR NEW_BIN_DIR" >&2; exit 2; }
OLD=$(realpath "$1") NEW=$(realpath "$2")
ROUNDS=${ROUNDS:-3}
AB_DIR=${AB_DIR:-/tmp/chorus-ab}
NO_LIMITS="--rate-sends-per-user 0 --rate-requests-per-connection 0 --rate-registrations-per-address 0 --rate-rooms-per-user 0"
RESULTS="$AB_DIR/results.jsonl"
mkdir -p "$AB_DIR"
: >"$RESULTS"

fresh_cluster() { # build
  scripts/cluster.sh reset >/dev/null 2>&1 || true
  rm -rf "$XDG_CONFIG_HOME/chorus/sessions"
  CHORUS_NODE_ARGS="$NO_LIMITS" scripts/cluster.sh up >/dev/null
  "$CHORUS_BIN_DIR/chorus" register bench-runner --password-stdin <<<"bench-runner-password" >/dev/null
}

for round in $(seq "$ROUNDS"); do
  for build in old new; do
    if [ "$build" = old ]; then export CHORUS_BIN_DIR=$OLD; else export CHORUS_BIN_DIR=$NEW; fi
    export CHORUS_CLUSTER_DIR=$AB_DIR/cluster-$build XDG_CONFIG_HOME=$AB_DIR/config-$build CHORUS_PROFILE=bench
    fresh_cluster
    tp=$("$CHORUS_BIN_DIR/chorus" --json bench --connections 8 --inflight 256 --size 200 --rooms 64 --duration 20s)
    rss=""
    for i in 1 2 3; do
      rss+="$(awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$(cat "$CHORUS_CLUSTER_DIR/run/node-$i.pid")/status") "
    done
    fresh_cluster
    seq=$("$CHORUS_BIN_DIR/chorus" --json bench --connections 1 --inflight 1 --rooms 1 --duration 10s)
    scripts/cluster.sh down >/dev/null 2>&1 || true
    python3 - "$build" "$round" "$rss" "$tp" "$seq" "$RESULTS" <<'PY'
import sys, json
build, rnd, rss, tp, seq, out = sys.argv[1:]
tp, seq = json.loads(tp), json.loads(seq)
row = {"build": build, "round": int(rnd), "msgs_per_s": tp["msgs_per_s"], "ack_p99_ms": tp["ack"]["p99_us"] / 1000,
       "seq_p50_ms": seq["ack"]["p50_us"] / 1000, "seq_p99_ms": seq["ack"]["p99_us"] / 1000,
       "rss_mib": [int(x) for x in rss.split()]}
open(out, "a").write(json.dumps(row) + "\n")
print(f"{build} round {rnd}: throughput {row['msgs_per_s']:.0f} msgs/s, ack p99 {row['ack_p99_ms']:.1f} ms | "
      f"sequential p50 {row['seq_p50_ms']:.2f} ms, p99 {row['seq_p99_ms']:.2f} ms | peak RSS {rss}MiB", flush=True)
PY
  done
done

python3 - "$RESULTS" <<'PY'
import sys, json, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
for build in ("old", "new"):
    mine = [r for r in rows if r["build"] == build]
    med = lambda k: statistics.median(r[k] for r in mine)
    print(f"{build}: median throughput {med('msgs_per_s'):.0f} msgs/s, ack p99 {med('ack_p99_ms'):.1f} ms, "
          f"sequential p50 {med('seq_p50_ms'):.2f} ms over {len(mine)} rounds")
PY
