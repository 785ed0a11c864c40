#!/usr/bin/env bash
# Runs the whole Chorus test suite: unit tests, openraft's storage suite, crash and snapshot
# tests, and (as they land) the multi-node integration and chaos tests.
#
# Works on a fresh Debian/Ubuntu machine with only Rust installed: missing system packages are
# installed first. Extra arguments go to `cargo test` (e.g. `scripts/test.sh -p chorus-raft`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/system-deps.sh
ensure_build_deps

# Build everything once, then run: the build dominates on small machines.
cargo test --workspace --no-run --locked "$@"
cargo test --workspace --locked "$@"
