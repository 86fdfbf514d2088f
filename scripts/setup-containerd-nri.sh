#!/usr/bin/env bash
# Starts a second containerd, 1.7 with NRI enabled, beside the node's 1.6, for the tests of
# the start gate's NRI wiring (janus-agent/tests/nri.rs). Debian 12 has no containerd with
# NRI: Debian 13's package is fetched from Debian's archive, checked against its digest and
# unpacked under /opt (nothing of the system's is replaced). Its sockets, root and state are
# its own, under /run/janus-test/containerd-nri. It runs pods through the CRI plugin, with
# the host's network and a local image (busybox-static, built here): no registry.
# Idempotent: a running daemon is left alone.
set -euo pipefail

VERSION=1.7.24~ds1-6+deb13u1
DEB=containerd_${VERSION}_amd64.deb
URL=https://deb.debian.org/debian/pool/main/c/containerd/$DEB
DIGEST=ed708deb96fe476a3bce4efa5c0538dfbcf717ab9a7c7944ba7260342c25899c
PREFIX=/opt/janus-test/containerd-nri
RUN=/run/janus-test/containerd-nri
SOCKET=$RUN/containerd.sock
IMAGE=janus.test/busybox:1
LOG=${JANUS_CONTAINERD_NRI_LOG:-/var/log/janus-containerd-nri.log}
log() { printf 'setup-containerd-nri: %s\n' "$*" >&2; }
ctr() { "$PREFIX/usr/bin/ctr" --address "$SOCKET" "$@"; }

bash "$(dirname "$0")/setup-containerd.sh" # runc and busybox-static
if ! command -v curl >/dev/null; then
    log "installing curl"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends curl ca-certificates
fi
if ! [ -x "$PREFIX/usr/bin/containerd" ]; then
    tmp=$(mktemp -d)
    log "fetching $URL"
    curl -fsSL --retry 3 -o "$tmp/$DEB" "$URL"
    echo "$DIGEST  $tmp/$DEB" | sha256sum -c --quiet -
    mkdir -p "$PREFIX.partial"
    dpkg-deb -x "$tmp/$DEB" "$PREFIX.partial"
    rm -rf "$PREFIX" "$tmp"
    mv "$PREFIX.partial" "$PREFIX"
fi

if ! ctr version >/dev/null 2>&1; then
    mkdir -p "$RUN/cni"
    cat >"$RUN/config.toml" <<CONF
version = 2
root = "/var/lib/janus-test/containerd-nri"
state = "$RUN/state"
[grpc]
  address = "$SOCKET"
[ttrpc]
  address = "$SOCKET.ttrpc"
[plugins."io.containerd.nri.v1.nri"]
  disable = false
  socket_path = "$RUN/nri.sock"
  plugin_path = "$RUN/nri-plugins"
  plugin_config_path = "$RUN/nri-conf"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$IMAGE"
  # A sandbox's oom_score_adj no lower than the daemon's own: this machine's root may not
  # lower it.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = "$RUN/cni"
CONF
    log "starting containerd $VERSION with NRI (log: $LOG)"
    # Its own shim first in PATH; setsid: the daemon outlives this script.
    PATH="$PREFIX/usr/bin:$PATH" setsid "$PREFIX/usr/bin/containerd" --config "$RUN/config.toml" \
        >>"$LOG" 2>&1 </dev/null &
    echo $! >"$RUN/containerd.pid" # for the test that restarts it
    deadline=$((SECONDS + 30))
    until ctr version >/dev/null 2>&1 && [ -S "$RUN/nri.sock" ]; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "containerd did not answer on $SOCKET within 30 s; last log lines:"
            tail -n 20 "$LOG" >&2 || true
            exit 1
        fi
        sleep 0.2
    done
fi

if ! ctr -n k8s.io images check "name==$IMAGE" 2>/dev/null | grep -q complete; then
    # An OCI image of one layer: busybox and the directories a container needs. Its
    # command sleeps, so that it serves as the pod's sandbox too.
    tmp=$(mktemp -d)
    mkdir -p "$tmp/layer/bin" "$tmp/layer/data" "$tmp/oci/blobs/sha256"
    for d in dev proc sys tmp etc; do mkdir -p "$tmp/layer/$d"; done
    cp /bin/busybox "$tmp/layer/bin/busybox"
    for applet in sh cat sleep; do ln -s busybox "$tmp/layer/bin/$applet"; done
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$tmp/layer" -cf "$tmp/layer.tar" .
    blob() { # FILE -> "DIGEST SIZE", the file stored as a blob
        local d
        d=$(sha256sum "$1" | cut -d' ' -f1)
        cp "$1" "$tmp/oci/blobs/sha256/$d"
        echo "$d $(stat -c %s "$1")"
    }
    read -r layer layer_size < <(blob "$tmp/layer.tar")
    printf '{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/sleep","2147483647"],"Env":["PATH=/bin"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
        "$layer" >"$tmp/config.json"
    read -r config config_size < <(blob "$tmp/config.json")
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
        "$config" "$config_size" "$layer" "$layer_size" >"$tmp/manifest.json"
    read -r manifest manifest_size < <(blob "$tmp/manifest.json")
    printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s"},"platform":{"architecture":"amd64","os":"linux"}}]}' \
        "$manifest" "$manifest_size" "$IMAGE" >"$tmp/oci/index.json"
    echo '{"imageLayoutVersion":"1.0.0"}' >"$tmp/oci/oci-layout"
    tar -C "$tmp/oci" -cf "$tmp/image.tar" .
    ctr -n k8s.io images import "$tmp/image.tar" >/dev/null
    rm -rf "$tmp"
    log "imported $IMAGE"
fi
log "containerd $VERSION with NRI is up on $SOCKET (NRI: $RUN/nri.sock)"
