#!/usr/bin/env bash
# Writes containerd's default OCI spec with the Janus start gate as its createRuntime hook:
# the base every pod container's spec starts from once config.toml names it
# (containerd/config.toml; docs/operations.md, "The start gate"). Run it on the node, with
# the containerd that reads the file: its own default spec is what the CRI plugin would use.
#   make-base-spec.sh [OUT] [HOOK]
set -euo pipefail
out=${1:-/etc/containerd/janus-base-spec.json}
hook=${2:-/opt/janus/bin/janus-agent}
spec=$(ctr oci spec)
printf '%s\n' "$spec" | jq --arg hook "$hook" '
  .hooks.createRuntime = ((.hooks.createRuntime // [])
    | map(select(.path != $hook))
    + [{path: $hook, args: ["janus-agent", "hook"], timeout: 120}])' >"$out.partial"
mv "$out.partial" "$out"
echo "make-base-spec: wrote $out (hook $hook)" >&2
