#!/bin/sh
# kata-py-deploy install|uninstall|monitor: put kata-py on this node, take it
# off, or serve its sandboxes' metrics (microvm monitor, kata-monitor's role).
# Runs in a privileged pod with hostPID and the host's / at /host; every
# change is made in the host's own namespaces (nsenter -t 1).  Idempotent.
#
# The defaults are a node's; the tests point them at a scratch directory:
#   HOST_EXEC          prefix that runs a command on the host
#   HOST_ROOT          the host's / as this container sees it
#   SRC                this repository, in the image
#   DEST               where kata-py lives on the host
#   SETUP              what installs it there (Debian packages, venv, kernel, image)
#   MICROVM            the microvm command on the host
#   CONTAINERD_CONFIG  containerd's config.toml on the host
#   RESTART_CONTAINERD how to restart containerd on the host
#   STATE, BIN_DIR     kata-py's state, and where setup linked its commands
set -eu

HOST_EXEC=${HOST_EXEC-nsenter --target 1 --mount --uts --ipc --net --pid --}
HOST_ROOT=${HOST_ROOT-/host}
SRC=${SRC:-/opt/kata-py-src}
DEST=${DEST:-/opt/kata-py}
SETUP=${SETUP:-$DEST/src/scripts/setup}
MICROVM=${MICROVM:-/usr/local/bin/microvm}
CONTAINERD_CONFIG=${CONTAINERD_CONFIG:-/etc/containerd/config.toml}
RESTART_CONTAINERD=${RESTART_CONTAINERD:-systemctl restart containerd}
STATE=${STATE:-/var/lib/kata-py}
BIN_DIR=${BIN_DIR:-/usr/local/bin}
LABEL=kata-py.io/runtime

say() { echo "kata-py-deploy: $*"; }
host() { $HOST_EXEC "$@"; }

# The node's label, through the API server with the pod's service account
# (no kubectl needed); skipped outside a cluster.
label() {
    if [ -z "${KUBERNETES_SERVICE_HOST:-}" ] || [ -z "${NODE_NAME:-}" ]; then
        say "not in a cluster: node label left alone"
        return 0
    fi
    sa=/var/run/secrets/kubernetes.io/serviceaccount
    curl -sS --fail --cacert "$sa/ca.crt" -H "Authorization: Bearer $(cat "$sa/token")" \
        -H "Content-Type: application/merge-patch+json" -X PATCH \
        -d "{\"metadata\":{\"labels\":{\"$LABEL\":$1}}}" \
        "https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/api/v1/nodes/$NODE_NAME" \
        >/dev/null
}

install() {
    say "copying kata-py to $DEST/src"
    rm -rf "$HOST_ROOT$DEST/src.new"
    mkdir -p "$HOST_ROOT$DEST"
    cp -a "$SRC" "$HOST_ROOT$DEST/src.new"
    rm -rf "$HOST_ROOT$DEST/src"
    mv "$HOST_ROOT$DEST/src.new" "$HOST_ROOT$DEST/src"
    say "installing (packages, venv, guest kernel and image)"
    host $SETUP
    host "$MICROVM" install containerd --config "$CONTAINERD_CONFIG"
    host $RESTART_CONTAINERD
    label '"true"'
    say "installed"
}

uninstall() {
    label null
    if host test -e "$CONTAINERD_CONFIG" && host test -x "$MICROVM"; then
        host "$MICROVM" uninstall containerd --config "$CONTAINERD_CONFIG"
        host $RESTART_CONTAINERD
    fi
    rm -rf "$HOST_ROOT$DEST" "$HOST_ROOT$STATE"
    rm -f "$HOST_ROOT$BIN_DIR/microvm" "$HOST_ROOT$BIN_DIR/containerd-shim-kata-py-v2"
    say "uninstalled"
}

case "${1:-install}" in
    install) install ;;
    uninstall) uninstall ;;
    # In the host's namespaces: the shims' sockets, their /proc, its network.
    monitor) exec $HOST_EXEC "$MICROVM" monitor --listen "${LISTEN:-0.0.0.0:8090}" ;;
    *) echo "usage: kata-py-deploy install|uninstall|monitor" >&2; exit 2 ;;
esac
# A DaemonSet's pod stays Running once its work is done (NO_WAIT=1: exit).
[ -n "${NO_WAIT:-}" ] || exec sleep infinity
