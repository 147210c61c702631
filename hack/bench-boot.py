#!/usr/bin/env python3
"""Boot benchmark for one sandbox (numbers, not assertions).

(a) `virtc sandbox create` wall time, i.e. until the guest agent answers;
(b) the floor: the same kernel booted by a bare QEMU command line to an
    /init (busybox) that only prints a line — measured for q35 and microvm;
(c) PSS of QEMU plus its helpers for one idle sandbox.

Reports medians of N runs and the ratio a/b against the floor of the machine
type in use, measured in the same run.

usage: hack/bench-boot.py [--runs N] [--virtc PATH] [--guest DIR]

--guest: the image directory (vmlinux, initramfs.cpio, modules.img if any)
both the floor and the sandboxes boot; default build/guest.
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QEMU = "/usr/bin/qemu-system-x86_64"
# The same base parameters the hypervisor crate gives every guest.
KPARAMS = ("console=ttyS0 quiet panic=1 reboot=k no_timer_check rcupdate.rcu_expedited=1 "
           "i8042.noaux=1 i8042.nomux=1 i8042.nopnp=1 i8042.dumbkbd=1 cryptomgr.notests "
           "random.trust_cpu=on pci=lastbus=0")


def floor_initrd(tmp):
    root = os.path.join(tmp, "floor")
    os.makedirs(os.path.join(root, "bin"))
    shutil.copy("/bin/busybox", os.path.join(root, "bin/busybox"))
    with open(os.path.join(root, "init"), "w") as f:
        f.write("#!/bin/busybox sh\necho FLOOR-INIT-REACHED\nexec /bin/busybox sleep 60\n")
    os.chmod(os.path.join(root, "init"), 0o755)
    out = os.path.join(tmp, "floor.cpio")
    subprocess.run(f"cd {root} && find . | cpio --quiet -o -H newc > {out}", shell=True, check=True)
    return out


def floor_once(kernel, initrd, machine):
    if machine == "q35":
        mach = ["-machine", "q35,smm=off,vmport=off,sata=off,usb=off,i8042=off,hpet=off"]
        params = KPARAMS
    else:
        khz = cpu_khz()
        mach = ["-machine", "microvm,pit=off,pic=off,isa-serial=on"]
        params = KPARAMS + f" tsc=reliable tsc_early_khz={khz}"
    cmd = [QEMU, *mach, "-accel", "tcg,tb-size=32", "-cpu", "max", "-m", "256M", "-nodefaults",
           "-no-user-config", "-display", "none", "-vga", "none", "-no-reboot", "-serial", "stdio",
           "-kernel", kernel, "-initrd", initrd, "-append", params]
    start = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    elapsed = None
    buf = b""
    while True:
        chunk = p.stdout.read1(4096) if hasattr(p.stdout, "read1") else p.stdout.read(1)
        if not chunk:
            break
        buf += chunk
        if b"FLOOR-INIT-REACHED" in buf:
            elapsed = time.monotonic() - start
            break
        if time.monotonic() - start > 60:
            break
    p.kill()
    p.wait()
    return elapsed


def cpu_khz():
    for line in open("/proc/cpuinfo"):
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    return 0


def pss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pids_mentioning(needle):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            out.append((int(d), cmd.split()[0]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--virtc", default=os.path.join(ROOT, "target/debug/virtc"))
    ap.add_argument("--guest", default=os.path.join(ROOT, "build/guest"))
    ap.add_argument("--memory", type=int, default=256)
    args = ap.parse_args()
    args.guest = os.path.abspath(args.guest)
    kernel = os.path.join(args.guest, "vmlinux")

    tmp = tempfile.mkdtemp(prefix="vcbench", dir="/tmp")
    try:
        initrd = floor_initrd(tmp)
        cfg = os.path.join(tmp, "config.toml")
        with open(cfg, "w") as f:
            f.write(f'state_dir = "{tmp}/state"\nrun_dir = "{tmp}/run"\n')
            # The sandboxes boot the image the floor does (and its
            # modules.img, if that directory has one).
            f.write(f'[hypervisor]\nkernel = "{kernel}"\ninitrd = "{args.guest}/initramfs.cpio"\n')
        virtc = [args.virtc, "--config", cfg, "sandbox"]

        floors = {"q35": [], "microvm": []}
        creates, pss, ready_ms = [], [], []
        for i in range(args.runs):
            # Interleave the three measurements so drift affects all alike.
            for machine in floors:
                t = floor_once(kernel, initrd, machine)
                if t is not None:
                    floors[machine].append(t)
            sid = f"bench{i}"
            start = time.monotonic()
            subprocess.run(virtc + ["create", sid, "--memory", str(args.memory)], check=True,
                           stdout=subprocess.DEVNULL)
            creates.append(time.monotonic() - start)
            status = json.loads(subprocess.run(virtc + ["status", sid, "--json"], check=True,
                                               capture_output=True).stdout)
            ready_ms.append(status.get("guest", {}).get("agent_ready_ms", 0))
            time.sleep(2)  # idle
            procs = pids_mentioning(f"{tmp}/run/{sid}/")
            pss.append(sum(pss_kib(p) for p, _ in procs) / 1024)
            subprocess.run(virtc + ["stop", sid], check=True, stdout=subprocess.DEVNULL)
            subprocess.run(virtc + ["delete", sid], check=True, stdout=subprocess.DEVNULL)

        med = statistics.median
        a = med(creates)
        print(f"runs: {args.runs}, guest memory {args.memory} MiB, accel {status.get('accel')}, machine {status.get('machine')}")
        print(f"(a) create until the agent answers: median {a:.3f} s  (min {min(creates):.3f}, max {max(creates):.3f})")
        print(f"    guest uptime when the agent served: median {med(ready_ms):.0f} ms")
        for machine, ts in floors.items():
            if ts:
                print(f"(b) floor, bare QEMU to /init, {machine}: median {med(ts):.3f} s  (min {min(ts):.3f}, max {max(ts):.3f})")
        b = med(floors[status.get("machine", "q35")] or [float("nan")])
        print(f"    a/b = {a / b:.2f}  (floor of the same machine type)")
        print(f"(c) PSS of QEMU + helpers, one idle sandbox: median {med(pss):.1f} MiB  ({', '.join(f'{p:.1f}' for p in pss)})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
