#!/usr/bin/env bash
# Builds the agent and the benchmark in release and runs the benchmark on this machine's
# kernel: open+close latency and decisions per second with no agent, the floor (a minimal
# fanotify listener) and the agent, and the new-directory window. Prints one table.
#
#   bash scripts/bench.sh                      # defaults
#   bash scripts/bench.sh --rounds 9           # any janus-bench argument
#   bash scripts/bench.sh scale                # the node-scale benchmark (1,000 containers)
#   bash scripts/bench.sh scale --containers 300   # any janus-scale-bench argument
#   bash scripts/bench.sh start-window         # how long a new container runs unguarded
#                                              # (containerd running)
#
# Needs root (fanotify permission events, mount namespaces) and busybox-static.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
if [ "$(id -u)" -ne 0 ]; then
    echo "bench.sh: run as root (fanotify permission events and mount namespaces)" >&2
    exit 1
fi
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed'; then
    echo "bench.sh: installing busybox-static" >&2
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends busybox-static
fi
cargo build --release --locked -p janus-agent -p janus-tests --bins >&2
if [ "${1:-}" = scale ]; then
    shift
    exec ./target/release/janus-scale-bench --agent ./target/release/janus-agent "$@"
fi
if [ "${1:-}" = start-window ]; then
    shift
    exec ./target/release/janus-start-window --agent ./target/release/janus-agent "$@"
fi
exec ./target/release/janus-bench --agent ./target/release/janus-agent "$@"
