#!/usr/bin/env bash
# Janus in one minute: a real container (containerd + runc), a JanusGuard that denies
# /data but allows /data/public, and the agent's decision lines as someone who entered
# the container (`ctr task exec`, as `kubectl exec` would) tries both.
#
#   sudo bash scripts/demo.sh
#
# Installs what it needs (containerd, runc, busybox-static), builds the agent, and
# removes the container when done.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
[ "$(id -u)" -eq 0 ] || { echo "demo.sh: run as root (fanotify and containerd need it)" >&2; exit 1; }
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

say() { printf '\n\033[1m%s\033[0m\n' "$*"; }
work=$(mktemp -d /tmp/janus-demo.XXXXXX)
id=janus-demo-$$
agent_pid=
cleanup() {
    [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
    ctr task kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    ctr task rm -f "$id" >/dev/null 2>&1 || true
    ctr container rm "$id" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

say "1. containerd and the agent"
bash scripts/setup-containerd.sh
cargo build --release --locked -p janus-agent 2>&1 | tail -n 1
agent=$top/target/release/janus-agent

say "2. a container: busybox, /data/secret, /data/public"
rootfs=$work/rootfs
mkdir -p "$rootfs"/{bin,data,proc,dev,sys,tmp}
cp /bin/busybox "$rootfs/bin/busybox"
echo "the launch codes" > "$rootfs/data/secret"
echo "the lunch menu" > "$rootfs/data/public"
ctr run -d --rootfs "$rootfs" "$id" /bin/busybox sleep 3600 >/dev/null
pid=$(ctr task ls | awk -v id="$id" '$1 == id { print $2 }')
echo "container $id runs as host pid $pid"

say "3. the JanusGuard"
cat > "$work/guard.yaml" <<YAML
apiVersion: januscontroller.clustergarage.io/v1alpha1
kind: JanusGuard
metadata:
  name: demo-guard
spec:
  selector:
    matchLabels:
      app: demo
  subjects:
  - allow:
    - /data/public
    deny:
    - /data
    events:
    - all
    tags:
      team: demo
YAML
cat "$work/guard.yaml"

say "4. the agent guards the container"
"$agent" guard --file "$work/guard.yaml" --pid "$pid" --pod "$id" --node "$(hostname)" \
    --metrics-addr 127.0.0.1:9701 >"$work/decisions.log" 2>"$work/agent.log" &
agent_pid=$!
http_get() { # path -> body; plain bash, no curl needed
    exec 3<>/dev/tcp/127.0.0.1/9701 && printf 'GET %s HTTP/1.0\r\n\r\n' "$1" >&3 && cat <&3; exec 3>&-
}
deadline=$((SECONDS + 20))
until http_get /readyz 2>/dev/null | grep -q '^ready'; do
    [ "$SECONDS" -lt "$deadline" ] || { cat "$work/agent.log"; echo "agent not ready" >&2; exit 1; }
    sleep 0.1
done
echo "agent ready (pid $agent_pid); its backend, from its diagnostics on stderr:"
grep -m1 'enforcement backend' "$work/agent.log" | sed 's/\x1b\[[0-9;]*m//g' || true

say "5. someone execs into the container"
for f in /data/public /data/secret; do
    echo "\$ cat $f"
    ctr task exec --exec-id "cat-$RANDOM" "$id" /bin/busybox cat "$f" 2>&1 || true
done

say "6. the agent's decision lines (stdout)"
deadline=$((SECONDS + 5))
until [ "$(grep -c . "$work/decisions.log")" -ge 2 ] || [ "$SECONDS" -ge "$deadline" ]; do sleep 0.1; done
cat "$work/decisions.log"

say "7. what Prometheus sees"
http_get /metrics | grep '^janus_decisions_total' | grep -v ' 0$'

say "8. SIGTERM: the guard is lifted"
kill "$agent_pid"; wait "$agent_pid"; agent_pid=
ctr task exec --exec-id "cat-$RANDOM" "$id" /bin/busybox cat /data/secret
