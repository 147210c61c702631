#!/usr/bin/env bash
# Builds the guest image: build/guest/vmlinux (uncompressed, PVH entry),
# build/guest/initramfs.cpio (vc-agent as /init plus the kernel modules the
# guest needs to boot) and build/guest/modules.img (the kernel's whole module
# tree, an ext4 image every VM gets as a read-only disk, for modprobe).
# Rebuilds only what an input changed for.
#
# usage: hack/build-guest.sh PATH/TO/static/vc-agent
#
# The kernel comes from Debian's linux-image-*-amd64 package, downloaded and
# unpacked under build/ — never installed into the host's /boot.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
agent_bin=${1:?usage: $0 PATH/TO/vc-agent}
out=${GUEST_OUT:-$root/build/guest}
work=$root/build/guest-work

# Modules the guest loads, by name; dependencies are resolved through
# modules.dep. `boot_modules` are loaded before the agent serves (the vsock
# path to the host); `later_modules` right after, in the background, so that
# their ~0.4 s under TCG does not delay the sandbox. Keep in step with what
# the agent and later issues use.
boot_modules=(
  virtio_pci                 # the PCI transport of every virtio device (q35)
  virtio_mmio                # the transport of microvm's devices
  vmw_vsock_virtio_transport # AF_VSOCK: the agent's channel to the host
)
# Loaded before the agent serves instead of nothing when the VM has no vsock
# (hypervisor.vsock = "serial", kernel parameter vc.channel=serial): the
# agent's API is then on a virtio-serial port.
serial_modules=(
  virtio_console             # virtio-serial ports
)
# In the order a pod needs them: RunPodSandbox waits for the NIC driver,
# the first CreateContainer for the rest.
later_modules=(
  virtio_net                 # pod network
  virtio_mem                 # memory hot-plug and unplug (q35)
  virtio_balloon             # free page reporting: freed guest memory back to the host
  virtiofs                   # shared-dir rootfs (virtio-fs)
  overlay                    # container rootfs layering
  virtio_scsi sd_mod ext4    # block-device rootfs (disks on the virtio-scsi controller)
  crc32c_generic             # ext4 metadata checksums (the kernel cannot modprobe it itself)
  9pnet_virtio 9p            # shared-dir fallback
  virtio_rng                 # guest entropy without waiting on jitter
  virtio_blk                 # the read-only modules disk (modules.img), mounted last
)

die() { echo "build-guest: $*" >&2; exit 1; }
[ -x "$agent_bin" ] || die "no agent binary at $agent_bin (make guest builds it)"
# PID 1 of an initramfs without a libc: it must have no ELF interpreter.
if readelf -l "$agent_bin" | grep -q 'INTERP'; then die "$agent_bin is not statically linked"; fi
# Smoke test: outside a VM the agent refuses to run (exit 2) — a binary that
# crashes in its C runtime start-up instead (seen with a static libseccomp)
# would only show as a guest kernel panic.
rc=0; "$agent_bin" >/dev/null 2>&1 || rc=$?
[ "$rc" -eq 2 ] || die "$agent_bin does not start (exit $rc; expected 2, 'must run as PID 1')"

resolve_kernel() {
  apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'
}
kpkg=$(resolve_kernel)
[ -n "$kpkg" ] || die "apt does not know linux-image-amd64 (run hack/install-deps.sh, which runs apt-get update)"

mkdir -p "$work/debs" "$out"
deb=$(ls "$work/debs/${kpkg}"_*.deb 2>/dev/null | tail -n1 || true)
if [ -z "$deb" ]; then
  if ! (cd "$work/debs" && apt-get download -q "$kpkg" >/dev/null 2>&1); then
    # Stale package lists (the mirror dropped that kernel): refresh, re-resolve, retry once.
    apt-get update -qq
    kpkg=$(resolve_kernel)
    (cd "$work/debs" && apt-get download -q "$kpkg" >/dev/null 2>&1) || die "apt-get download $kpkg failed"
  fi
  deb=$(ls "$work/debs/${kpkg}"_*.deb | tail -n1)
fi

key=$( { basename "$deb"; sha256sum "$agent_bin" | cut -d' ' -f1; sha256sum "$0" | cut -d' ' -f1; } | sha256sum | cut -d' ' -f1)
# The modules image depends on the kernel package and this script only: a
# new agent does not rebuild it.
modules_key=$( { basename "$deb"; sha256sum "$0" | cut -d' ' -f1; } | sha256sum | cut -d' ' -f1)
boot_current=false modules_current=false
if [ -f "$out/.inputs" ] && [ "$(cat "$out/.inputs")" = "$key" ] \
   && [ -f "$out/vmlinux" ] && [ -f "$out/initramfs.cpio" ]; then
  boot_current=true
fi
if [ -f "$out/.inputs-modules" ] && [ "$(cat "$out/.inputs-modules")" = "$modules_key" ] \
   && [ -f "$out/modules.img" ]; then
  modules_current=true
fi
if $boot_current && $modules_current; then
  echo "build-guest: up to date ($out)"
  exit 0
fi

echo "build-guest: unpacking $(basename "$deb")"
rm -rf "$work/kernel" "$work/initramfs"
mkdir -p "$work/kernel"
dpkg-deb -x "$deb" "$work/kernel"
release=$(ls "$work/kernel/lib/modules" | head -n1)
[ -n "$release" ] || die "no modules in $deb"
vmlinuz="$work/kernel/boot/vmlinuz-$release"
moddir="$work/kernel/lib/modules/$release"

# The package leaves modules.dep to the install-time depmod; make it here.
depmod -b "$work/kernel" "$release"

# The whole module tree as a read-only ext4 image (root: <release>/, with
# depmod's modules.dep, .alias, .builtin, .builtin.modinfo, ...). ext4
# because the guest loads ext4 already (block rootfs) and e2fsprogs is
# installed: no new guest module, no new host package. No journal (nothing
# ever writes it), no reserved blocks; the file is sparse, sized from the
# tree with headroom, then shrunk to its minimum.
if ! $modules_current; then
  started=$(date +%s.%N)
  tree="$work/kernel/lib/modules"
  img="$out/modules.img.new"
  kib=$(du -s --apparent-size -k "$tree" | cut -f1)
  files=$(find "$tree" | wc -l)
  rm -f "$img"
  mkfs.ext4 -q -F -L vc-modules -t ext4 -O ^has_journal -m 0 -b 4096 \
    -N $((files + 256)) -E root_owner=0:0 -d "$tree" "$img" $((kib * 5 / 4 + files * 4 + 16384))k \
    || die "mkfs.ext4 -d $tree failed"
  resize2fs -M "$img" >/dev/null 2>&1 || die "resize2fs -M $img failed"
  e2fsck -fn "$img" >/dev/null 2>&1 || die "$img does not check clean"
  chmod 0644 "$img"
  mv -f "$img" "$out/modules.img"
  echo "$modules_key" > "$out/.inputs-modules"
  echo "build-guest: $out/modules.img ($(du -h --apparent-size "$out/modules.img" | cut -f1), $files files from $((kib / 1024)) MiB) in $(python3 -c "import sys,time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$started") s"
fi
if $boot_current; then
  echo "build-guest: $out/vmlinux and initramfs.cpio up to date"
  rm -rf "$work/kernel"
  exit 0
fi

# The bzImage is a decompressor plus an xz payload; QEMU can boot the
# uncompressed ELF directly through its PVH entry point, which saves the ~2 s
# the decompressor spends under TCG.
offset=$(python3 -c 'import sys; print(open(sys.argv[1], "rb").read().find(b"\xfd7zXZ\x00"))' "$vmlinuz")
[ "$offset" -ge 0 ] || offset=
[ -n "$offset" ] || die "no xz payload in $vmlinuz"
tail -c +$((offset + 1)) "$vmlinuz" | xz -dc --single-stream > "$work/vmlinux" 2>/dev/null || true
readelf -h "$work/vmlinux" >/dev/null 2>&1 || die "extracted vmlinux is not an ELF file"
readelf -n "$work/vmlinux" | grep -q 'Xen' || die "vmlinux has no PVH (Xen ELF) note; QEMU cannot boot it directly"

# Debian's vmlinux stores ~23 MiB of zeroes (bss) as file bytes of its last
# PT_LOAD segment. QEMU keeps the file bytes of every segment mapped for the
# VM's lifetime, so they count in its footprint; declared as memory-only
# (p_filesz < p_memsz) they are zero-filled instead. Same image, ELF-wise.
python3 - "$work/vmlinux" <<'PY'
import struct, sys
path = sys.argv[1]
with open(path, "r+b") as f:
    data = f.read()
    if data[:5] != b"\x7fELF\x02":
        sys.exit("build-guest: vmlinux is not a 64-bit ELF file")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    trimmed = 0
    for i in range(phnum):
        at = phoff + i * phentsize
        p_type, _, p_offset, _, _, p_filesz, p_memsz, _ = struct.unpack_from("<IIQQQQQQ", data, at)
        if p_type != 1:  # PT_LOAD
            continue
        segment = data[p_offset:p_offset + p_filesz]
        keep = len(segment.rstrip(b"\0"))
        if keep < p_filesz:
            f.seek(at + 32)  # p_filesz
            f.write(struct.pack("<Q", keep))
            trimmed += p_filesz - keep
print(f"build-guest: {trimmed / 2**20:.1f} MiB of zero file bytes declared as memory-only")
PY

# Resolve module dependencies: modules.dep lists "path: dep dep ..."; load
# dependencies first, each module once.
staging="$work/initramfs"
mkdir -p "$staging/lib/modules/$release"
python3 - "$moddir" "$staging/lib/modules" "${boot_modules[*]}" "${later_modules[*]}" "${serial_modules[*]}" <<'PY'
import os, shutil, sys
moddir, dest, boot, later, serial = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split(), sys.argv[5].split()
release = os.path.basename(moddir)
deps, by_name = {}, {}
for line in open(os.path.join(moddir, "modules.dep")):
    path, _, rest = line.strip().partition(":")
    deps[path] = rest.split()
    by_name[os.path.basename(path).split(".ko")[0].replace("-", "_")] = path
builtin = set()
for line in open(os.path.join(moddir, "modules.builtin")):
    builtin.add(os.path.basename(line.strip()).split(".ko")[0].replace("-", "_"))
seen = set()
def resolve(names):
    order = []
    def visit(path):
        if path in seen:
            return
        seen.add(path)
        for dep in reversed(deps[path]):
            visit(dep)
        order.append(path)
    for name in names:
        key = name.replace("-", "_")
        if key in builtin:
            continue
        if key not in by_name:
            sys.exit(f"build-guest: module {name} is neither in modules.dep nor built in")
        visit(by_name[key])
    return order
lists = {"vc-modules-boot": resolve(boot), "vc-modules-serial": resolve(serial), "vc-modules-later": resolve(later)}
for listname, order in lists.items():
    for path in order:
        target = os.path.join(dest, release, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(moddir, path), target)
    with open(os.path.join(dest, listname), "w") as f:
        f.write("# generated by hack/build-guest.sh: load in this order\n")
        f.write("".join(p + "\n" for p in order))
print(f"build-guest: {len(lists['vc-modules-boot'])} boot, {len(lists['vc-modules-serial'])} serial and {len(lists['vc-modules-later'])} later modules for {release}")
PY

install -m 0755 "$agent_bin" "$staging/init"
# The agent is also the guest's modprobe (it dispatches on argv[0]); it
# points /proc/sys/kernel/modprobe here once the modules disk is there.
mkdir -p "$staging/sbin"
ln -s /init "$staging/sbin/modprobe"
mkdir -p "$staging/proc" "$staging/sys" "$staging/dev" "$staging/run" "$staging/tmp"
# An uncompressed newc archive: the kernel unpacks it without a decompressor.
(cd "$staging" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc --reproducible -R 0:0) > "$work/initramfs.cpio"

install -m 0644 "$work/vmlinux" "$out/vmlinux.new" && mv -f "$out/vmlinux.new" "$out/vmlinux"
install -m 0644 "$work/initramfs.cpio" "$out/initramfs.cpio.new" && mv -f "$out/initramfs.cpio.new" "$out/initramfs.cpio"
echo "$release" > "$out/kernel-release"
echo "$key" > "$out/.inputs"
rm -rf "$work/kernel" "$work/initramfs" "$work/vmlinux" "$work/initramfs.cpio"
echo "build-guest: $out/vmlinux ($(du -h "$out/vmlinux" | cut -f1)), $out/initramfs.cpio ($(du -h "$out/initramfs.cpio" | cut -f1))"
