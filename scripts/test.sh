#!/usr/bin/env bash
# Runs the whole Chorus test suite: formatting and clippy (warnings are errors), unit and
# property tests, openraft's storage suite, crash
# and snapshot tests, multi-node integration tests with real chorusd processes, and a short
# chaos run (kill -9, pause and partition a live 3-node cluster, then check every history).
#
# Works on a fresh Debian/Ubuntu machine with only Rust installed: missing system packages are
# installed first. Partitions need root (iptables); without root the chaos run leaves them out
# and says so. Environment: CHAOS_DURATION (default 120s), CHAOS_SEED (default random).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/system-deps.sh
ensure_build_deps
ensure_packages iptables
ensure_packages fuse3
# The terminal chat's end-to-end test drives it in tmux.
ensure_packages tmux

TARGET="${CARGO_TARGET_DIR:-$PWD/target}"

# Formatting and lints first: they are quick, and a change that fails them does not land.
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

# Build everything once, then run: the build dominates on small machines.
cargo build --workspace --bins --locked
cargo test --workspace --no-run --locked
cargo test --workspace --locked

# The short chaos run, against the binaries just built.
chaos=("$TARGET/debug/chorus-chaos" run --nodes 3 --duration "${CHAOS_DURATION:-120s}"
       --out "$TARGET/chaos/ci")
[ -n "${CHAOS_SEED:-}" ] && chaos+=(--seed "$CHAOS_SEED")
if [ "$(id -u)" -eq 0 ]; then
  "${chaos[@]}"
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo "${chaos[@]}"
else
  echo "scripts/test.sh: not root and no passwordless sudo: the chaos run leaves out partitions and power cuts" >&2
  "${chaos[@]}" --faults kill,pause
fi
