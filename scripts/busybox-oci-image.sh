#!/usr/bin/env bash
# Builds a busybox container image as an OCI image archive, offline, from the host's
# busybox-static: one layer (/bin/busybox and its applet links, /etc/passwd, /etc/group, /tmp).
# Reproducible: the same busybox gives the same bytes.
#
# Usage: scripts/busybox-oci-image.sh OUT.tar [NAME]
#   NAME defaults to localhost/ferry/busybox:latest
# Then:  ctr images import OUT.tar   (the archive names the image)
set -euo pipefail

out="${1:?usage: $0 OUT.tar [NAME]}"
name="${2:-localhost/ferry/busybox:latest}"
busybox="$(command -v busybox || true)"
if [ -z "$busybox" ] || ! file -L "$busybox" 2>/dev/null | grep -q 'statically linked'; then
    for b in /bin/busybox /usr/bin/busybox; do
        [ -x "$b" ] && busybox="$b"
    done
fi
[ -x "$busybox" ] || { echo "error: busybox not found (apt-get install busybox-static)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/root" "$root/proc" "$root/sys" "$root/dev"
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    case "$applet" in busybox|*/*) continue ;; esac
    ln -s busybox "$root/bin/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"
chmod 1777 "$root/tmp"

blobs="$work/image/blobs/sha256"
mkdir -p "$blobs"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$root" -cf "$work/layer.tar" .
sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }
layer_sha="$(sha "$work/layer.tar")"
mv "$work/layer.tar" "$blobs/$layer_sha"

printf '%s' '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:'"$layer_sha"'"]},"history":[{"created_by":"ferry scripts/busybox-oci-image.sh"}]}' >"$work/config.json"
config_sha="$(sha "$work/config.json")"
config_size="$(size "$work/config.json")"
mv "$work/config.json" "$blobs/$config_sha"

printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'"$config_sha"'","size":'"$config_size"'},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:'"$layer_sha"'","size":'"$(size "$blobs/$layer_sha")"'}]}' >"$work/manifest.json"
manifest_sha="$(sha "$work/manifest.json")"
manifest_size="$(size "$work/manifest.json")"
mv "$work/manifest.json" "$blobs/$manifest_sha"

printf '%s' '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:'"$manifest_sha"'","size":'"$manifest_size"',"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"'"$name"'","org.opencontainers.image.ref.name":"'"${name##*:}"'"}}]}' >"$work/image/index.json"
printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$work/image/oci-layout"

tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$work/image" -cf "$out" .
echo "$name"
