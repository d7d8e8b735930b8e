#!/usr/bin/env bash
# Runs the whole test suite: unit and property tests of every crate, and the
# end-to-end tests in tests/it that start real server nodes (in-process and
# as child processes) on free ports with throwaway data directories.
set -euo pipefail
cd "$(dirname "$0")/.."
# The process-level tests run the im-server binary: build it first.
cargo build --workspace --bins
cargo test --workspace "$@"
