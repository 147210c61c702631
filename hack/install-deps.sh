#!/usr/bin/env bash
# Installs what building and testing virtcontainers needs, and nothing else.
# Idempotent: a second run checks and returns in well under a second.
#
# Host packages come from Debian's apt; helpers that Debian does not ship are
# `cargo install`ed at pinned versions. The guest kernel is NOT installed on
# the host: hack/build-guest.sh downloads its package and unpacks it under build/.
set -euo pipefail

# Debian packages, one reason each.
packages=(
  qemu-system-x86      # the VMM (ships /usr/lib/qemu/virtiofsd too)
  busybox-static       # tests build throwaway guests and rootfs from it
  cpio                 # the guest initramfs archive
  xz-utils             # unpacking the kernel's xz payload into vmlinux
  kmod                 # depmod, to resolve guest module dependencies
  binutils             # readelf, to check the agent and the kernel ELF
  libc6-dev            # static glibc for the vc-agent build
  libseccomp-dev       # static libseccomp.a: the agent applies seccomp profiles
  python3              # small build helpers (module resolution)
  runc                 # the container benchmark's baseline (make bench)
  containerd           # the CRI benchmark's baseline (make bench: containerd + runc)
  docker-registry      # image tests push to and pull from a real registry on loopback
  skopeo               # the image benchmark's baseline (copy) and test image pushes
  umoci                # the image benchmark's baseline (unpack)
  e2fsprogs            # mkfs.ext4 -d: block-device rootfs images
  qemu-utils           # qemu-img: per-container qcow2 overlays over a block image
  containernetworking-plugins  # CNI plugins (bridge, host-local, portmap, loopback) in /usr/lib/cni
  iproute2             # ip and tc, for tests that inspect namespaces and filters
  iptables             # the portmap and bridge plugins program iptables
  util-linux           # nsenter and unshare for tests
  protobuf-compiler    # protoc, for the CRI protocol (k8s-cri) and the agent API
  golang-go            # the streaming interop test's client: moby/spdystream, kubectl's SPDY library
  golang-github-docker-spdystream-dev  # (that library's source, for the Go client above)
  golang-google-grpc-dev  # the CRI interop test's Go client: gRPC-Go, kubelet's and crictl's gRPC
  protoc-gen-go        # Go messages generated from the CRI proto for that client
  protoc-gen-go-grpc   # Go gRPC stubs generated from the CRI proto for that client
  golang-github-golang-protobuf-1-5-dev  # the protobuf runtime both use (1.3's lacks the API protoc-gen-go targets)
  python3-venv         # the venv for grpcio (below)
)

# PyPI packages for the CRI interop test's Python client (grpcio sends the
# socket path percent-encoded as :authority), in a venv under build/: name version.
py_env=build/pyenv
py_packages=(
  "grpcio 1.85.1"
  "grpcio-tools 1.85.1"
)

# Cargo-installed helpers: name version binary.
cargo_helpers=(
  "vhost-device-vsock 0.3.0 vhost-device-vsock"   # userspace vsock when /dev/vhost-vsock is absent
)

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

# build-guest.sh needs package lists to find and download the kernel.
if [ ${#missing[@]} -gt 0 ] || ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
  echo "install-deps: apt-get update"
  as_root apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "install-deps: cargo is required (rustup)" >&2; exit 1; }
cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
for entry in "${cargo_helpers[@]}"; do
  read -r name version bin <<<"$entry"
  if ! "$cargo_bin/$bin" --version 2>/dev/null | grep -q " $version\$"; then
    echo "install-deps: cargo install $name@$version"
    cargo install --quiet --locked "$name@$version"
  fi
done

# A second run only looks for the packages' dist-info directories.
cd "$(dirname "$0")/.."
[ -x "$py_env/bin/python3" ] || python3 -m venv "$py_env"
want=()
for entry in "${py_packages[@]}"; do
  read -r name version <<<"$entry"
  compgen -G "$py_env/lib/python3*/site-packages/${name//-/_}-$version.dist-info" >/dev/null ||
    want+=("$name==$version")
done
if [ ${#want[@]} -gt 0 ]; then
  echo "install-deps: pip install ${want[*]} into $py_env"
  "$py_env/bin/python3" -m pip install --quiet --disable-pip-version-check "${want[@]}"
fi
