#!/bin/sh
# Installs podnet's CNI plugin and network configuration on the node.
#
# Runs as the DaemonSet's init container, with the host's /opt/cni/bin and /etc/cni/net.d
# mounted. Order matters: the container runtime starts using a network configuration as soon
# as a *.conflist appears in the configuration directory, so the plugin binary is put in
# place first and the conflist is written LAST. Both are written to a hidden temporary name
# in the destination directory, flushed to disk, then renamed: rename(2) within one
# directory is atomic, so the runtime sees either the old file or the complete new one,
# never a half-written binary or JSON document.
#
# Idempotent: a file whose content already matches is left alone (same inode, same mtime).
#
# Environment (defaults are the paths inside the podnet image and init container):
#   PODNET_CNI_BINARY    plugin to install           (/usr/local/bin/podnet-cni)
#   PODNET_CONFLIST      network configuration file  (/etc/podnet/cni/10-podnet.conflist)
#   CNI_BIN_DIR          host plugin directory       (/host/opt/cni/bin)
#   CNI_CONF_DIR         host configuration dir      (/host/etc/cni/net.d)
#   PODNET_CONFLIST_NAME name in CNI_CONF_DIR        (basename of PODNET_CONFLIST)
#   PODNET_CNI_PLUGINS   reference plugins the conflist chains, space-separated (none)
#   PODNET_CNI_PLUGIN_DIR where the image has them   (/usr/lib/cni)
#
# A reference plugin (ptp) is installed only where CNI_BIN_DIR has none: the node's own
# copy, maybe newer, is left alone.
#
# Prints one line per step on stdout: "installed <path>", "unchanged <path>" or
# "present <path>" (a reference plugin the node already has).
set -eu

binary="${PODNET_CNI_BINARY:-/usr/local/bin/podnet-cni}"
conflist="${PODNET_CONFLIST:-/etc/podnet/cni/10-podnet.conflist}"
bin_dir="${CNI_BIN_DIR:-/host/opt/cni/bin}"
conf_dir="${CNI_CONF_DIR:-/host/etc/cni/net.d}"
conflist_name="${PODNET_CONFLIST_NAME:-$(basename "$conflist")}"
plugins="${PODNET_CNI_PLUGINS:-}"
plugin_dir="${PODNET_CNI_PLUGIN_DIR:-/usr/lib/cni}"

tmp=""
cleanup() {
    if [ -n "$tmp" ] && [ -e "$tmp" ]; then
        rm -f "$tmp"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

die() {
    echo "install-cni: $*" >&2
    exit 1
}

# Flushes a file (or directory) to disk. coreutils' sync(1) syncs only the named files
# (fsync); if this sync cannot take operands, sync everything.
flush() {
    sync "$1" 2>/dev/null || sync
}

# install_atomic SOURCE DIR NAME MODE: puts SOURCE at DIR/NAME through a temporary file in DIR.
install_atomic() {
    src="$1"
    dir="$2"
    name="$3"
    mode="$4"
    dest="$dir/$name"
    [ -f "$src" ] || die "$src: no such file"
    [ -d "$dir" ] || die "$dir: no such directory (is the host path mounted?)"
    if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
        # Content already in place; make sure the mode is right too (cheap, idempotent).
        chmod "$mode" "$dest"
        echo "unchanged $dest"
        return 0
    fi
    # Hidden name without a .conf/.conflist/.json suffix: the runtime never loads it.
    tmp="$dir/.$name.podnet-tmp.$$"
    rm -f "$tmp"
    cp "$src" "$tmp"
    chmod "$mode" "$tmp"
    flush "$tmp"
    mv -f "$tmp" "$dest"
    tmp=""
    # Make the rename itself durable.
    flush "$dir"
    echo "installed $dest"
}

# A temporary file left by an installer that was killed mid-copy.
for stale in "$bin_dir"/.*.podnet-tmp.* "$conf_dir"/.*.podnet-tmp.*; do
    if [ -e "$stale" ]; then
        rm -f "$stale"
    fi
done

for plugin in $plugins; do
    if [ -e "$bin_dir/$plugin" ]; then
        echo "present $bin_dir/$plugin"
    else
        install_atomic "$plugin_dir/$plugin" "$bin_dir" "$plugin" 0755
    fi
done
install_atomic "$binary" "$bin_dir" podnet-cni 0755
# Last: from here on the runtime may call podnet-cni, which is already complete.
install_atomic "$conflist" "$conf_dir" "$conflist_name" 0644
