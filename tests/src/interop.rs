//! CRI clients in other languages, built at test time: a Go one on Debian's
//! gRPC-Go (`tests/go/cri_client`, GOPATH mode) and a Python one on PyPI's
//! grpcio (`tests/python/cri_client.py`, in hack/install-deps.sh's
//! build/pyenv). Both get stubs generated from the CRI proto the `k8s-cri`
//! crate ships. A missing toolchain is an `Err` with the reason (the test
//! prints `SKIPPED:` and returns); a failing generation or build panics.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use crate::repo_root;

/// Debian's Go source tree (GOPATH mode).
const GOPATH: &str = "/usr/share/gocode";

/// k8s-cri's `proto/v1.proto`, from cargo's registry sources.
pub fn cri_proto() -> Result<PathBuf, String> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .ok_or("neither CARGO_HOME nor HOME is set")?;
    let src = cargo_home.join("registry/src");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&src)
        .map_err(|e| format!("{}: {e}", src.display()))?
        .flatten()
        .flat_map(|index| {
            std::fs::read_dir(index.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter(|e| e.file_name().to_string_lossy().starts_with("k8s-cri-0.11"))
        .map(|e| e.path().join("proto/v1.proto"))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found
        .pop()
        .ok_or_else(|| format!("no k8s-cri-0.11*/proto/v1.proto under {}", src.display()))
}

fn have(cmd: &str, arg: &str) -> bool {
    Command::new(cmd).arg(arg).output().is_ok()
}

fn check(what: &str, out: std::io::Result<Output>) {
    let out = out.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `cmd` with a deadline; its output.
async fn run(mut cmd: tokio::process::Command, deadline: Duration) -> Output {
    cmd.kill_on_drop(true);
    tokio::time::timeout(deadline, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{cmd:?} did not finish in {deadline:?}"))
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// The Go client, built in a temp dir of its own.
#[derive(Debug)]
pub struct GoClient {
    dir: tempfile::TempDir,
}

impl GoClient {
    /// Generates the stubs (package `vcrtest/criv1`: the proto's go_package
    /// is k8s.io/cri-api/..., remapped with protoc's `M` option) and builds.
    pub fn build() -> Result<Self, String> {
        let grpc = Path::new(GOPATH).join("src/google.golang.org/grpc");
        if !have("go", "version") || !have("protoc-gen-go", "--version") || !grpc.is_dir() {
            return Err(format!(
                "needs go, protoc-gen-go, protoc-gen-go-grpc and {} (Debian: golang-go, \
                 protoc-gen-go, protoc-gen-go-grpc, golang-google-grpc-dev; hack/install-deps.sh)",
                grpc.display()
            ));
        }
        let proto = cri_proto()?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let gopath = dir.path().join("gopath");
        let src = gopath.join("src");
        std::fs::create_dir_all(&src).map_err(|e| e.to_string())?;
        let map = "Mv1.proto=vcrtest/criv1";
        check(
            "protoc (Go)",
            Command::new("protoc")
                .arg("-I")
                .arg(proto.parent().unwrap_or(Path::new(".")))
                .arg(format!("--go_out={}", src.display()))
                .arg(format!("--go_opt={map}"))
                .arg(format!("--go-grpc_out={}", src.display()))
                .arg(format!("--go-grpc_opt={map}"))
                .arg("v1.proto")
                .output(),
        );
        check(
            "go build",
            Command::new("go")
                .args(["build", "-o"])
                .arg(dir.path().join("cri_client"))
                .arg(".")
                .current_dir(repo_root().join("tests/go/cri_client"))
                .env("GO111MODULE", "off")
                .env("GOPATH", format!("{}:{GOPATH}", gopath.display()))
                .env("GOCACHE", dir.path().join("gocache"))
                .env("GOFLAGS", "")
                .output(),
        );
        Ok(Self { dir })
    }

    /// `cri_client <args>` against `socket`.
    pub async fn run(&self, socket: &Path, args: &[&str], deadline: Duration) -> Output {
        let mut cmd = tokio::process::Command::new(self.dir.path().join("cri_client"));
        cmd.arg(args[0]).arg("-socket").arg(socket).args(&args[1..]);
        run(cmd, deadline).await
    }
}

/// The Python client with its generated stubs.
#[derive(Debug)]
pub struct PythonClient {
    stubs: tempfile::TempDir,
    python: PathBuf,
}

impl PythonClient {
    pub fn build() -> Result<Self, String> {
        let python = repo_root().join("build/pyenv/bin/python3");
        let probe = Command::new(&python)
            .args(["-c", "import grpc, grpc_tools"])
            .output();
        if !probe.map(|o| o.status.success()).unwrap_or(false) {
            return Err(format!(
                "needs {} with grpcio and grpcio-tools (hack/install-deps.sh)",
                python.display()
            ));
        }
        let proto = cri_proto()?;
        let stubs = tempfile::tempdir().map_err(|e| e.to_string())?;
        check(
            "grpc_tools.protoc",
            Command::new(&python)
                .args(["-m", "grpc_tools.protoc", "-I"])
                .arg(proto.parent().unwrap_or(Path::new(".")))
                .arg(format!("--python_out={}", stubs.path().display()))
                .arg(format!("--grpc_python_out={}", stubs.path().display()))
                .arg("v1.proto")
                .output(),
        );
        Ok(Self { stubs, python })
    }

    /// `cri_client.py <stubs> <socket> <command>`.
    pub async fn run(&self, socket: &Path, command: &str, deadline: Duration) -> Output {
        let mut cmd = tokio::process::Command::new(&self.python);
        cmd.arg(repo_root().join("tests/python/cri_client.py"))
            .arg(self.stubs.path())
            .arg(socket)
            .arg(command)
            .env("PYTHONDONTWRITEBYTECODE", "1");
        run(cmd, deadline).await
    }
}

/// The one JSON object a client printed, or a panic showing what it said.
pub fn json_of(what: &str, out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: {e}: {:?}", String::from_utf8_lossy(&out.stdout)))
}
