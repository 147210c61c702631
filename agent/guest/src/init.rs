//! What PID 1 does before it can serve: API filesystems, console, modules.

use std::{
    fs::{self, File, OpenOptions},
    io::{BufRead, BufReader},
    os::fd::AsRawFd,
    path::Path,
};

use anyhow::Context as _;
use nix::{
    mount::{mount, MsFlags},
    sys::reboot::{reboot, RebootMode},
};

/// Modules the image builder resolved, in load order (dependencies first),
/// one path per line relative to the modules directory: those needed to
/// reach the host, and the rest, loaded once the agent serves.
pub const BOOT_MODULES: &str = "/lib/modules/vc-modules-boot";
pub const LATER_MODULES: &str = "/lib/modules/vc-modules-later";
/// What a VM without vsock needs before the agent serves (virtio-serial).
pub const SERIAL_MODULES: &str = "/lib/modules/vc-modules-serial";

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /run, /tmp and the cgroup2
/// hierarchy, and reopens stdio on /dev/console.
pub fn early() -> anyhow::Result<()> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mounts: [(&str, &str, &str, MsFlags, Option<&str>); 8] = [
        ("proc", "/proc", "proc", nodev, None),
        ("sysfs", "/sys", "sysfs", nodev, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("gid=5,mode=620,ptmxmode=666"),
        ),
        (
            "shm",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nodev,
            Some("nsdelegate"),
        ),
    ];
    for (source, target, fstype, flags, data) in mounts {
        fs::create_dir_all(target).with_context(|| format!("mkdir {target}"))?;
        mount(Some(source), target, Some(fstype), flags, data)
            .with_context(|| format!("mount {fstype} on {target}"))?;
        if target == "/dev" {
            reopen_console()?;
        }
    }
    Ok(())
}

/// The initramfs has no /dev/console, so the kernel started us without
/// stdio; now that devtmpfs is mounted, attach fds 0, 1 and 2 to the console.
fn reopen_console() -> anyhow::Result<()> {
    let console = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
        .context("open /dev/console")?;
    for fd in [0, 1, 2] {
        nix::unistd::dup2(console.as_raw_fd(), fd).context("dup2 console")?;
    }
    Ok(())
}

/// Loads every module of `list`; a module that is already loaded or built in
/// is fine, a missing list is an empty one. Returns how many were loaded.
pub fn load_modules(list: &str) -> anyhow::Result<usize> {
    let release = nix::sys::utsname::uname()
        .context("uname")?
        .release()
        .to_string_lossy()
        .into_owned();
    let dir = Path::new("/lib/modules").join(&release);
    let file = match File::open(list) {
        Ok(f) => f,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(err).context(list.to_string()),
    };
    let mut loaded = 0;
    for line in BufReader::new(file).lines() {
        let line = line.with_context(|| list.to_string())?;
        let rel = line.trim();
        if rel.is_empty() || rel.starts_with('#') {
            continue;
        }
        if crate::modules::load(&dir.join(rel), "")? {
            loaded += 1;
        }
    }
    Ok(loaded)
}

/// Syncs and powers the VM off. Never returns.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let err = reboot(RebootMode::RB_POWER_OFF);
    eprintln!("vc-agent: power off failed: {err:?}");
    // Nothing else a PID 1 can do: block forever rather than exit (which
    // would panic the kernel with a less helpful message).
    loop {
        std::thread::park();
    }
}

/// Brings the loopback interface up: containers share the VM's network
/// namespace and talk to each other over 127.0.0.1.
pub fn loopback_up() -> anyhow::Result<()> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the flags of the interface named in `ifr`
    // into `ifr.ifr_ifru`; `ifr` is a valid, exclusively borrowed ifreq and
    // `sock` an open socket for the duration of the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(std::io::Error::last_os_error()).context("SIOCGIFFLAGS lo");
    }
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    unsafe { ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: as above; SIOCSIFFLAGS only reads `ifr`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(std::io::Error::last_os_error()).context("SIOCSIFFLAGS lo");
    }
    Ok(())
}
