//! Onlining what the host hot-plugged: vCPUs (ACPI hot-plug leaves a new
//! CPU offline; udev would online it, the guest has no udev) and memory
//! blocks (the kernel onlines virtio-mem's itself with
//! `memhp_default_state=online`; a block it left offline is onlined here).

use std::{
    fs,
    path::Path,
    time::{Duration, Instant},
};

const CPUS: &str = "/sys/devices/system/cpu";
const MEMORY: &str = "/sys/devices/system/memory";

/// Onlines every offline CPU and memory block until `cpus` CPUs are online
/// or `timeout` passes; returns how many are online.
pub fn online_resources(cpus: u32, timeout: Duration) -> u32 {
    let deadline = Instant::now() + timeout;
    loop {
        online_offline(Path::new(CPUS), "cpu", "online", "0", "1");
        online_offline(Path::new(MEMORY), "memory", "state", "offline", "online");
        let online = online_cpus();
        if online >= cpus || Instant::now() >= deadline {
            return online;
        }
        // The ACPI notification of a new CPU is handled asynchronously.
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The number of online CPUs, from `/sys/devices/system/cpu/online`.
pub fn online_cpus() -> u32 {
    fs::read_to_string(Path::new(CPUS).join("online"))
        .map(|list| count_list(&list))
        .unwrap_or(0)
}

/// Writes `on` to `<dir>/<prefix>N/<file>` where it reads `off`. Failures
/// are logged: a block the kernel cannot online is not fatal to the rest.
fn online_offline(dir: &Path, prefix: &str, file: &str, off: &str, on: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let is_numbered = name
            .strip_prefix(prefix)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !is_numbered {
            continue;
        }
        let path = entry.path().join(file);
        match fs::read_to_string(&path) {
            Ok(state) if state.trim() == off => {
                if let Err(err) = fs::write(&path, on) {
                    tracing::warn!(path = %path.display(), "cannot online: {err}");
                }
            }
            _ => {}
        }
    }
}

/// How many CPUs a kernel CPU list ("0-3,5\n") names.
fn count_list(list: &str) -> u32 {
    list.trim()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|range| match range.split_once('-') {
            Some((a, b)) => match (a.parse::<u32>(), b.parse::<u32>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 0,
            },
            None => u32::from(range.parse::<u32>().is_ok()),
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_count() {
        assert_eq!(count_list("0\n"), 1);
        assert_eq!(count_list("0-3,5\n"), 5);
        assert_eq!(count_list("0,2-2"), 2);
        assert_eq!(count_list(""), 0);
        assert_eq!(count_list("3-1,x"), 0);
    }

    #[test]
    fn offline_entries_are_onlined_and_others_left() {
        let dir = tempfile::tempdir().unwrap();
        for (name, state) in [
            ("cpu0", None),
            ("cpu1", Some("0\n")),
            ("cpu2", Some("1\n")),
            ("cpufreq", Some("0\n")),
        ] {
            fs::create_dir(dir.path().join(name)).unwrap();
            if let Some(state) = state {
                fs::write(dir.path().join(name).join("online"), state).unwrap();
            }
        }
        online_offline(dir.path(), "cpu", "online", "0", "1");
        let read = |n: &str| fs::read_to_string(dir.path().join(n).join("online")).unwrap();
        assert_eq!(read("cpu1"), "1");
        assert_eq!(read("cpu2"), "1\n");
        assert_eq!(read("cpufreq"), "0\n", "not a numbered CPU");
    }
}
