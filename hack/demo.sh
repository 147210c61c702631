#!/usr/bin/env bash
# Walks one sandbox through its lifecycle with virtc, in a throwaway state
# and run dir, and shows what the guest agent reports.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
virtc="$root/target/debug/virtc"
dir=$(mktemp -d /tmp/vcdemo.XXXXXX)
v() { echo "+ virtc $*" >&2; "$virtc" --state-dir "$dir/state" --run-dir "$dir/run" "$@"; }
cleanup() {
  "$virtc" --state-dir "$dir/state" --run-dir "$dir/run" sandbox stop demo >/dev/null 2>&1 || true
  "$virtc" --state-dir "$dir/state" --run-dir "$dir/run" sandbox delete demo >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT

v sandbox create demo --vcpus 1 --memory 256
v sandbox status demo
v sandbox start demo
v sandbox pause demo
v sandbox resume demo
v sandbox list
v sandbox stop demo
v sandbox delete demo
v sandbox list
