//! `virtc`, one process per call: the acceptance walk of a sandbox through
//! its states, and bad input with one-line errors.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::process::{Command, Output};

use serde_json::Value;
use tests::TestEnv;

struct Virtc {
    config: std::path::PathBuf,
}

impl Virtc {
    fn new(env: &TestEnv) -> Self {
        tests::become_subreaper();
        Self {
            config: env.write_config(),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(tests::workspace_bin("virtc"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("run virtc")
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        tests::virtc_ok(&self.config, args)
    }

    /// Runs and expects failure with a one-line reason; returns it.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "virtc {args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.starts_with("virtc: "), "{stderr}");
        stderr
    }

    fn status(&self, id: &str) -> Value {
        serde_json::from_str(&self.ok(&["sandbox", "status", id, "--json"])).expect("status JSON")
    }

    fn state(&self, id: &str) -> String {
        self.status(id)["state"].as_str().unwrap_or("").to_string()
    }
}

#[test]
fn a_sandbox_walks_through_every_state_one_call_at_a_time() {
    let env = TestEnv::new();
    let v = Virtc::new(&env);

    assert_eq!(
        v.ok(&["sandbox", "create", "s1", "--vcpus", "1", "--memory", "256"])
            .trim(),
        "s1 ready"
    );
    let status = v.status("s1");
    assert_eq!(status["id"], "s1");
    assert_eq!(status["state"], "ready");
    assert_eq!(status["hypervisor"], "qemu");
    assert_eq!(
        status["accel"], "tcg",
        "this machine's /dev/kvm is emulated: auto must pick TCG"
    );
    assert!(status["pid"].as_i64().is_some_and(|p| p > 1), "{status}");
    assert!(
        status["guest"]["kernel_release"]
            .as_str()
            .is_some_and(|k| !k.is_empty()),
        "{status}"
    );
    assert_eq!(status["guest"]["online_cpus"], 1);

    v.ok(&["sandbox", "start", "s1"]);
    assert_eq!(v.state("s1"), "running");
    v.ok(&["sandbox", "pause", "s1"]);
    assert_eq!(v.state("s1"), "paused");
    v.ok(&["sandbox", "resume", "s1"]);
    assert_eq!(v.state("s1"), "running");

    let err = v.fails(&["sandbox", "delete", "s1"]);
    assert!(
        err.contains("cannot delete sandbox s1: it is running (stop it first)"),
        "{err}"
    );
    let err = v.fails(&["sandbox", "create", "s1"]);
    assert!(err.contains("sandbox s1 already exists"), "{err}");

    v.ok(&["sandbox", "stop", "s1"]);
    assert_eq!(v.state("s1"), "stopped");
    assert!(
        env.processes().is_empty(),
        "no QEMU or helper after stop: {:?}",
        env.processes()
    );
    v.ok(&["sandbox", "delete", "s1"]);
    let list: Value =
        serde_json::from_str(&v.ok(&["sandbox", "list", "--json"])).expect("list JSON");
    assert_eq!(list, Value::Array(vec![]));
    env.assert_nothing_left("s1");
}

#[test]
fn a_vmm_killed_behind_virtcs_back_is_reported_with_the_reason() {
    let env = TestEnv::new();
    let v = Virtc::new(&env);
    v.ok(&["sandbox", "create", "k1"]);
    v.ok(&["sandbox", "start", "k1"]);
    let pid = v.status("k1")["pid"].as_i64().expect("pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
    let mut status = v.status("k1");
    for _ in 0..200 {
        if status["state"] == "stopped" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
        status = v.status("k1");
    }
    assert_eq!(status["state"], "stopped", "{status}");
    let reason = status["reason"].as_str().expect("reason");
    assert!(
        reason.contains(&format!("QEMU (pid {pid}) exited")),
        "{reason}"
    );
    assert!(
        env.processes().is_empty(),
        "the helper was stopped too: {:?}",
        env.processes()
    );
    v.ok(&["sandbox", "delete", "k1"]);
    env.assert_nothing_left("k1");
}

#[test]
fn bad_input_is_a_one_line_error() {
    let env = TestEnv::new();
    let v = Virtc::new(&env);
    let err = v.fails(&["sandbox", "create", "m0", "--memory", "0"]);
    assert!(
        err.contains("memory must be at least 64 MiB, got 0 MiB"),
        "{err}"
    );
    let err = v.fails(&["sandbox", "create", "c9", "--vcpus", "999"]);
    assert!(err.contains("vcpus must be between 1 and"), "{err}");
    let err = v.fails(&["sandbox", "start", "ghost"]);
    assert!(err.contains("sandbox ghost not found"), "{err}");
    let err = v.fails(&["sandbox", "create", "../x"]);
    assert!(err.contains("invalid sandbox ID"), "{err}");
    let missing = Command::new(tests::workspace_bin("virtc"))
        .args(["--config", "/nonexistent.toml", "sandbox", "list"])
        .output()
        .expect("run virtc");
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.starts_with("virtc: config /nonexistent.toml: "),
        "{stderr}"
    );
    let list: serde_json::Value =
        serde_json::from_str(&v.ok(&["sandbox", "list", "--json"])).expect("JSON");
    assert_eq!(list, Value::Array(vec![]), "no failed create left a record");
    assert!(env.processes().is_empty());
}

#[test]
fn containers_one_call_at_a_time() {
    let env = TestEnv::new();
    let v = Virtc::new(&env);
    let rootfs = tests::busybox_rootfs(env.dir.path());
    let rootfs = rootfs.to_str().expect("utf-8 path");
    v.ok(&["sandbox", "create", "c1"]);
    v.ok(&["sandbox", "start", "c1"]);

    // A container that exits on its own: its monitor (a process of its own,
    // virtc having exited) puts the output in the log and records the exit.
    let created = v.ok(&[
        "container",
        "create",
        "c1",
        "hello",
        "--rootfs",
        rootfs,
        "--",
        "/bin/sh",
        "-c",
        "echo hello; echo oops >&2; exit 3",
    ]);
    assert_eq!(created.trim(), "hello created");
    assert_eq!(
        v.ok(&["container", "start", "c1", "hello"]).trim(),
        "hello running"
    );
    let status = |id: &str| -> Value {
        serde_json::from_str(&v.ok(&["container", "status", "c1", id, "--json"])).expect("JSON")
    };
    let mut st = status("hello");
    for _ in 0..400 {
        if st["state"] == "stopped" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        st = status("hello");
    }
    assert_eq!(
        (&st["state"], &st["exit_code"]),
        (&"stopped".into(), &3.into()),
        "{st}"
    );
    let logs = v.run(&["container", "logs", "c1", "hello"]);
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "hello\n");
    assert_eq!(String::from_utf8_lossy(&logs.stderr), "oops\n");

    // Exec into a running one: exit status, stdin, a terminal.
    v.ok(&[
        "container",
        "create",
        "c1",
        "svc",
        "--rootfs",
        rootfs,
        "--",
        "/bin/sleep",
        "1000",
    ]);
    v.ok(&["container", "start", "c1", "svc"]);
    let seven = v.run(&[
        "container",
        "exec",
        "c1",
        "svc",
        "--",
        "/bin/sh",
        "-c",
        "exit 7",
    ]);
    assert_eq!(
        seven.status.code(),
        Some(7),
        "the exit status passes through"
    );
    let mut cat = Command::new(tests::workspace_bin("virtc"))
        .arg("--config")
        .arg(&v.config)
        .args(["container", "exec", "-i", "c1", "svc", "--", "/bin/cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("virtc exec -i");
    {
        use std::io::Write as _;
        let mut stdin = cat.stdin.take().expect("stdin");
        stdin.write_all(b"piped through\n").expect("write");
    }
    let out = cat.wait_with_output().expect("wait");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "piped through\n");
    let tty = v.ok(&["container", "exec", "-t", "c1", "svc", "--", "/bin/tty"]);
    assert!(tty.contains("/dev/pts/"), "{tty:?}");
    let ps = v.ok(&["container", "ps", "c1", "svc"]);
    assert!(ps.contains("/bin/sleep 1000"), "{ps}");
    let stats: Value =
        serde_json::from_str(&v.ok(&["container", "stats", "c1", "svc", "--json"])).expect("JSON");
    assert!(
        stats["pids_current"].as_u64().is_some_and(|n| n >= 1),
        "{stats}"
    );
    v.ok(&["container", "update", "c1", "svc", "--memory", "67108864"]);
    let stats: Value =
        serde_json::from_str(&v.ok(&["container", "stats", "c1", "svc", "--json"])).expect("JSON");
    assert_eq!(stats["memory_limit_bytes"], 67108864, "{stats}");
    // PID 1 of its namespace ignores TERM: the grace ends in KILL.
    assert_eq!(
        v.ok(&["container", "stop", "c1", "svc", "--timeout", "1"])
            .trim(),
        "svc stopped: exit 137"
    );
    assert_eq!(status("svc")["exit_code"], 137);

    let err = v.fails(&["container", "start", "c1", "ghost"]);
    assert!(err.contains("ghost") && err.contains("not found"), "{err}");
    let err = v.fails(&[
        "container",
        "create",
        "c1",
        "nofs",
        "--rootfs",
        "/nonexistent",
        "--",
        "/bin/true",
    ]);
    assert!(err.contains("/nonexistent"), "{err}");
    let usage = v.run(&["container", "create", "c1", "noargs", "--rootfs", rootfs]);
    assert!(!usage.status.success());
    assert!(
        String::from_utf8_lossy(&usage.stderr).contains("<COMMAND>"),
        "clap names the missing command"
    );

    v.ok(&["container", "delete", "c1", "hello"]);
    v.ok(&["container", "delete", "c1", "svc"]);
    let list: Value =
        serde_json::from_str(&v.ok(&["container", "list", "c1", "--json"])).expect("JSON");
    assert_eq!(list, Value::Array(vec![]));
    v.ok(&["sandbox", "stop", "c1"]);
    v.ok(&["sandbox", "delete", "c1"]);
    env.assert_nothing_left("c1");
}
