#!/usr/bin/env bash
# Installs containerd and runc from Debian's packages and makes sure a containerd
# daemon answers on its socket. Idempotent: a running daemon is left alone.
# Tests run real containers with `ctr run --rootfs DIR`: no image pull.
set -euo pipefail

SOCKET=/run/containerd/containerd.sock
LOG=${JANUS_CONTAINERD_LOG:-/var/log/janus-containerd.log}
log() { printf 'setup-containerd: %s\n' "$*" >&2; }

need=()
for pkg in containerd runc busybox-static; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi

if ctr --address "$SOCKET" version >/dev/null 2>&1; then
    exit 0
fi
log "starting containerd (log: $LOG)"
# setsid: the daemon outlives this script and the shell that ran it.
setsid containerd >>"$LOG" 2>&1 < /dev/null &
deadline=$((SECONDS + 30))
until ctr --address "$SOCKET" version >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        log "containerd did not answer on $SOCKET within 30 s; last log lines:"
        tail -n 20 "$LOG" >&2 || true
        exit 1
    fi
    sleep 0.2
done
log "containerd is up: $(ctr --address "$SOCKET" version 2>/dev/null | grep -m1 Version | tr -s ' ')"
