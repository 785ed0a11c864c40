#!/usr/bin/env bash
# Long chaos runs against a fresh local cluster (release build).
#
#   scripts/chaos.sh [--nodes 3|5] [--duration 30m] [--seed N] [--faults kill,pause,partition,power-cut]
#
# Any other chorus-chaos flag is passed through (chorus-chaos run --help). The history, report,
# node logs and data go to target/chaos/seed-<seed>/. Partitions need root: the script uses sudo
# when it is not root. Exit status: 0 when no anomaly was found.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/system-deps.sh
ensure_build_deps
ensure_packages iptables
# Power cuts mount each node's data dir through FUSE (fusermount3).
ensure_packages fuse3

args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes|--duration|--seed|--faults|--out|--shards|--writers|--readers|--subscribers|--hot-rooms|--cold-rooms)
      [ $# -ge 2 ] || { echo "chaos.sh: $1 needs a value" >&2; exit 2; }
      args+=("$1" "$2"); shift 2 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "chaos.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

printf '%s\n' "${args[@]}" | grep -qx -- --duration || args+=(--duration 30m)

cargo build --release --locked -p chorus-server -p chorus-chaos --bins
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
run=("$TARGET/release/chorus-chaos" run "${args[@]}")
if [ "$(id -u)" -eq 0 ]; then
  exec "${run[@]}"
else
  exec sudo "${run[@]}"
fi
