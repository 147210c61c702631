//! Interoperability with moby/spdystream, the SPDY library kubectl and kubelet use: a small Go
//! client built on it (tests/spdystream_client) drives exec, attach and port-forward against the
//! streaming server the way kubectl does (v4, no flow control, Go's zlib for headers).
//!
//! Needs Go and spdystream's source (Debian: golang-go, golang-github-docker-spdystream-dev);
//! without them the test says so and skips.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use cri::streaming::fake::FakeRuntime;
use cri::streaming::{AttachRequest, ExecRequest, PortForwardRequest, Server, ServerConfig};
use tokio::io::AsyncWriteExt;

const GOPATH: &str = "/usr/share/gocode";

fn exec(cmd: &[&str], stdin: bool) -> ExecRequest {
    ExecRequest {
        container_id: "c1".into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty: false,
        stdin,
        stdout: true,
        stderr: true,
    }
}

#[tokio::test]
async fn kubectls_spdy_library_speaks_to_the_server() {
    let spdystream = Path::new(GOPATH).join("src/github.com/moby/spdystream");
    let go = std::process::Command::new("go").arg("version").output();
    if go.is_err() || !spdystream.is_dir() {
        println!(
            "SKIPPED: needs `go` and {} (Debian packages golang-go, golang-github-docker-spdystream-dev)",
            spdystream.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let client = dir.path().join("client");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/spdystream_client");
    let build = tokio::process::Command::new("go")
        .args(["build", "-o"])
        .arg(&client)
        .arg(".")
        .current_dir(&src)
        .env("GO111MODULE", "off")
        .env("GOPATH", GOPATH)
        .env("GOCACHE", dir.path().join("gocache"))
        .output()
        .await
        .unwrap();
    assert!(
        build.status.success(),
        "go build: {}",
        String::from_utf8_lossy(&build.stderr)
    );

    let fake = FakeRuntime::start().await.unwrap();
    let server = Server::start(ServerConfig::default(), fake.clone())
        .await
        .unwrap();
    let cases = [
        (
            "echo",
            server
                .get_exec(exec(&["echo", "hello", "go"], false))
                .unwrap(),
        ),
        (
            "exit3",
            server.get_exec(exec(&["exit", "3"], false)).unwrap(),
        ),
        (
            "stderr",
            server.get_exec(exec(&["stderr", "oops"], false)).unwrap(),
        ),
        ("cat", server.get_exec(exec(&["cat"], true)).unwrap()),
        (
            "attach",
            server
                .get_attach(AttachRequest {
                    container_id: "c2".into(),
                    tty: false,
                    stdin: true,
                    stdout: true,
                    stderr: true,
                })
                .unwrap(),
        ),
        (
            "pf",
            server
                .get_port_forward(PortForwardRequest {
                    pod_sandbox_id: "pod1".into(),
                    ports: vec![],
                })
                .unwrap(),
        ),
    ];
    let mut child = tokio::process::Command::new(&client)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for (name, url) in &cases {
        stdin
            .write_all(format!("{name} {url}\n").as_bytes())
            .await
            .unwrap();
    }
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the Go client hung")
        .unwrap();
    assert!(
        out.status.success(),
        "Go client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let case = |name: &str| -> Vec<&serde_json::Value> {
        results.iter().filter(|r| r["case"] == name).collect()
    };
    let success = r#"{"metadata":{},"status":"Success"}"#;

    let echo = case("echo")[0];
    assert_eq!(echo["protocol"], "v4.channel.k8s.io");
    assert_eq!(echo["stdout"], "hello go\n");
    assert_eq!(echo["error"], success);

    let exit3: serde_json::Value =
        serde_json::from_str(case("exit3")[0]["error"].as_str().unwrap()).unwrap();
    assert_eq!(exit3["reason"], "NonZeroExitCode");
    assert_eq!(exit3["details"]["causes"][0]["message"], "3");

    assert_eq!(case("stderr")[0]["stderr"], "oops\n");

    // 3 MiB through cat: spdystream does no flow control, nothing may stall.
    let cat = case("cat")[0];
    assert_eq!(cat["stdout_len"], 3 << 20);
    assert_eq!(cat["stdout_is_stdin"], true);
    assert_eq!(cat["error"], success);

    assert_eq!(
        case("attach")[0]["stdout"],
        "attached c2\ntyped into attach\n"
    );

    let pf = case("pf");
    assert_eq!(pf.len(), 2);
    assert_eq!(pf[0]["protocol"], "portforward.k8s.io");
    assert_eq!(pf[0]["port"], "8080");
    assert_eq!(pf[0]["equal"], true);
    assert_eq!(pf[0]["error"], "");
    assert_eq!(pf[1]["port"], "1");
    assert!(
        pf[1]["error"]
            .as_str()
            .unwrap()
            .contains("error forwarding port 1 to pod pod1"),
        "{}",
        pf[1]
    );
}
