//! CPU priority of a VM's processes: a warm pool VM boots and idles at a
//! high nice value (so refilling the pool yields to running pods) and goes
//! back to 0 when a sandbox claims it.

/// Sets the nice value of every thread of `pids` (nice is per thread in
/// Linux, and a VMM's vCPU threads exist by the time it boots). Threads
/// that went meanwhile are skipped; other failures are logged: a VM at the
/// wrong priority still works.
pub(crate) fn set_nice(pids: &[u32], nice: i32) {
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<i32>().ok())
                .and_then(rustix::process::Pid::from_raw)
            else {
                continue;
            };
            match rustix::process::setpriority_process(Some(tid), nice) {
                Ok(()) | Err(rustix::io::Errno::SRCH) => {}
                Err(err) => tracing::warn!(
                    pid,
                    tid = tid.as_raw_nonzero().get(),
                    nice,
                    "setpriority: {err}"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_thread_of_a_process_is_reniced() {
        let mut child = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .expect("spawn");
        let pid = child.id();
        super::set_nice(&[pid], 7);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let _ = child.kill();
        let _ = child.wait();
        // Field 19 (nice), after the command name in parentheses.
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let nice: Vec<&str> = after.split_whitespace().collect();
        assert_eq!(nice.get(16).copied(), Some("7"), "{stat}");
    }
}
