//! `virtc container …`: the container half of the library, one process per
//! call. `create` also starts the container's monitor (`virtc container
//! monitor`, a process of its own that copies output into the log and
//! records the exit), since this process is gone by the time the container
//! writes anything.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::Subcommand;
use podsandbox::{
    container::{ContainerConfig, ContainerStatus, Mount, Resources, Rootfs},
    container_exec::ExecConfig,
    container_log::Stream,
    DiskFormat, Runtime,
};
use tokio::io::AsyncReadExt as _;

use crate::chain;

#[derive(Debug, Subcommand)]
pub enum ContainerCmd {
    /// Create a container (its process waits for `start`).
    Create {
        sandbox: String,
        id: String,
        /// The container's root filesystem: a host directory (shared into
        /// the VM), or a disk image with an ext4 filesystem (qcow2 or raw,
        /// attached to the VM; the container writes into it).
        #[arg(long)]
        rootfs: PathBuf,
        /// A terminal for the process.
        #[arg(long, short = 't')]
        tty: bool,
        /// Keep the process's stdin open.
        #[arg(long, short = 'i')]
        stdin: bool,
        /// KEY=VALUE, repeatable.
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// UID[:GID].
        #[arg(long)]
        user: Option<String>,
        /// Working directory in the container.
        #[arg(long)]
        cwd: Option<String>,
        /// The CRI log file; default <run_dir>/<sandbox>/logs/<id>.log.
        #[arg(long)]
        log: Option<PathBuf>,
        /// HOST:CONTAINER[:ro], repeatable.
        #[arg(long = "mount", short = 'v')]
        mounts: Vec<String>,
        /// memory limit in bytes.
        #[arg(long)]
        memory: Option<i64>,
        #[arg(long)]
        readonly_rootfs: bool,
        /// Share the sandbox-wide PID namespace.
        #[arg(long)]
        share_pid: bool,
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// created → running.
    Start {
        sandbox: String,
        id: String,
    },
    /// SIGTERM, then SIGKILL after --timeout seconds; prints the exit status.
    Stop {
        sandbox: String,
        id: String,
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Send a signal (number or name, default TERM).
    Kill {
        sandbox: String,
        id: String,
        #[arg(long, short = 's', default_value = "TERM")]
        signal: String,
        /// To every process of the container.
        #[arg(long)]
        all: bool,
    },
    Pause {
        sandbox: String,
        id: String,
    },
    Resume {
        sandbox: String,
        id: String,
    },
    /// Remove a stopped or created container.
    Delete {
        sandbox: String,
        id: String,
    },
    Status {
        sandbox: String,
        id: String,
        #[arg(long)]
        json: bool,
    },
    List {
        sandbox: String,
        #[arg(long)]
        json: bool,
    },
    /// cgroup usage: cpu, memory, pids, io.
    Stats {
        sandbox: String,
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// The processes of the container.
    Ps {
        sandbox: String,
        id: String,
    },
    /// New cgroup limits.
    Update {
        sandbox: String,
        id: String,
        #[arg(long)]
        memory: Option<i64>,
        #[arg(long)]
        cpu_shares: Option<u64>,
        #[arg(long)]
        cpu_quota: Option<i64>,
        #[arg(long)]
        cpu_period: Option<u64>,
        #[arg(long)]
        pids: Option<i64>,
    },
    /// Run a command in the running container; its exit status is ours.
    Exec {
        sandbox: String,
        id: String,
        #[arg(long, short = 't')]
        tty: bool,
        /// Forward our stdin.
        #[arg(long, short = 'i')]
        interactive: bool,
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// The container's output from its log (stdout to stdout, stderr to stderr).
    Logs {
        sandbox: String,
        id: String,
    },
    /// (internal) Copy the output to the log and record the exit.
    #[command(hide = true)]
    Monitor {
        sandbox: String,
        id: String,
    },
}

/// `--rootfs`: a directory, or a disk image (qcow2 by its magic, else raw).
fn rootfs_arg(path: &std::path::Path) -> anyhow::Result<Rootfs> {
    let path = absolute(path)?;
    if path.is_dir() {
        return Ok(Rootfs::Dir(path));
    }
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(
        &mut std::fs::File::open(&path).with_context(|| format!("--rootfs {}", path.display()))?,
        &mut magic,
    )
    .with_context(|| format!("--rootfs {}: too short for a disk image", path.display()))?;
    let format = if &magic == b"QFI\xfb" {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    };
    Ok(Rootfs::Block {
        image: path,
        format,
        fstype: "ext4".into(),
    })
}

/// Runs one command; the exit status virtc should end with.
pub async fn run(rt: &Runtime, cmd: ContainerCmd, passthrough: &[String]) -> anyhow::Result<u8> {
    match cmd {
        ContainerCmd::Create {
            sandbox,
            id,
            rootfs,
            tty,
            stdin,
            env,
            user,
            cwd,
            log,
            mounts,
            memory,
            readonly_rootfs,
            share_pid,
            command,
        } => {
            let log = log.unwrap_or_else(|| {
                rt.config()
                    .run_dir
                    .join(&sandbox)
                    .join("logs")
                    .join(format!("{id}.log"))
            });
            if let Some(dir) = log.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let config = ContainerConfig {
                id: id.clone(),
                rootfs: rootfs_arg(&rootfs)?,
                args: command,
                env,
                cwd,
                user: user.as_deref().map(parse_user).transpose()?,
                readonly_rootfs,
                log_path: Some(log),
                resources: Resources {
                    memory_limit_bytes: memory,
                    ..Default::default()
                },
                tty,
                stdin,
                mounts: mounts
                    .iter()
                    .map(|m| parse_mount(m))
                    .collect::<anyhow::Result<_>>()?,
                share_pid_namespace: share_pid,
                ..Default::default()
            };
            let status = rt.create_container(&sandbox, config).await.map_err(chain)?;
            spawn_monitor(passthrough, &sandbox, &id)?;
            out!("{} {}", status.id, status.state);
        }
        ContainerCmd::Start { sandbox, id } => {
            let status = rt.start_container(&sandbox, &id).await.map_err(chain)?;
            out!("{} {}", status.id, status.state);
        }
        ContainerCmd::Stop {
            sandbox,
            id,
            timeout,
        } => {
            let code = rt
                .stop_container(&sandbox, &id, Duration::from_secs(timeout))
                .await
                .map_err(chain)?;
            out!("{id} stopped: exit {code}");
        }
        ContainerCmd::Kill {
            sandbox,
            id,
            signal,
            all,
        } => {
            let sig = parse_signal(&signal)?;
            rt.kill_container(&sandbox, &id, sig, all)
                .await
                .map_err(chain)?;
        }
        ContainerCmd::Pause { sandbox, id } => {
            let s = rt.pause_container(&sandbox, &id).await.map_err(chain)?;
            out!("{} {}", s.id, s.state);
        }
        ContainerCmd::Resume { sandbox, id } => {
            let s = rt.resume_container(&sandbox, &id).await.map_err(chain)?;
            out!("{} {}", s.id, s.state);
        }
        ContainerCmd::Delete { sandbox, id } => {
            rt.delete_container(&sandbox, &id).await.map_err(chain)?;
            out!("{id} deleted");
        }
        ContainerCmd::Status { sandbox, id, json } => {
            let s = rt.container_status(&sandbox, &id).await.map_err(chain)?;
            if json {
                out!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s);
            }
        }
        ContainerCmd::List { sandbox, json } => {
            let all = rt.list_containers(&sandbox).await.map_err(chain)?;
            if json {
                out!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                out!("{:<24} {:<8} {:>5}", "ID", "STATE", "EXIT");
                for c in all {
                    let exit = c.exit_code.map(|e| e.to_string()).unwrap_or_default();
                    out!("{:<24} {:<8} {:>5}", c.id, c.state, exit);
                }
            }
        }
        ContainerCmd::Stats { sandbox, id, json } => {
            let s = rt.stats_container(&sandbox, &id).await.map_err(chain)?;
            if json {
                out!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                out!("cpu:     {} µs", s.cpu_usage_usec);
                out!(
                    "memory:  {} bytes (anon {}, file {}), limit {}",
                    s.memory_usage_bytes,
                    s.memory_anon_bytes,
                    s.memory_file_bytes,
                    if s.memory_limit_bytes == 0 {
                        "none".to_string()
                    } else {
                        s.memory_limit_bytes.to_string()
                    }
                );
                out!("pids:    {}", s.pids_current);
                out!(
                    "io:      read {} B, written {} B",
                    s.io_read_bytes,
                    s.io_write_bytes
                );
            }
        }
        ContainerCmd::Ps { sandbox, id } => {
            let all = rt.process_list(&sandbox, &id).await.map_err(chain)?;
            out!("{:>6} {:>6} CMD", "PID", "UID");
            for p in all {
                out!("{:>6} {:>6} {}", p.pid, p.uid, p.args.join(" "));
            }
        }
        ContainerCmd::Update {
            sandbox,
            id,
            memory,
            cpu_shares,
            cpu_quota,
            cpu_period,
            pids,
        } => {
            let r = Resources {
                memory_limit_bytes: memory,
                cpu_shares,
                cpu_quota,
                cpu_period,
                cpuset_cpus: None,
                pids_limit: pids,
            };
            rt.update_container(&sandbox, &id, &r)
                .await
                .map_err(chain)?;
        }
        ContainerCmd::Exec {
            sandbox,
            id,
            tty,
            interactive,
            env,
            command,
        } => return exec(rt, &sandbox, &id, tty, interactive, env, command).await,
        ContainerCmd::Logs { sandbox, id } => {
            let s = rt.container_status(&sandbox, &id).await.map_err(chain)?;
            let Some(path) = s.log_path else {
                bail!("container {id} has no log file");
            };
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            print_log(&text);
        }
        ContainerCmd::Monitor { sandbox, id } => {
            let code = rt.monitor_container(&sandbox, &id).await.map_err(chain)?;
            return Ok(u8::try_from(code & 0xff).unwrap_or(1));
        }
    }
    Ok(0)
}

/// Starts `virtc container monitor` in a session of its own, detached
/// from this process and its terminal.
fn spawn_monitor(passthrough: &[String], sandbox: &str, id: &str) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the virtc binary")?;
    std::process::Command::new(exe)
        .args(passthrough)
        .args(["container", "monitor", sandbox, id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("cannot start the container's monitor")?;
    Ok(())
}

use std::os::unix::process::CommandExt as _;

async fn exec(
    rt: &Runtime,
    sandbox: &str,
    id: &str,
    tty: bool,
    interactive: bool,
    env: Vec<String>,
    command: Vec<String>,
) -> anyhow::Result<u8> {
    let process = rt
        .exec(
            sandbox,
            id,
            ExecConfig {
                args: command,
                env,
                cwd: None,
                tty,
                stdin: interactive,
            },
        )
        .await
        .map_err(chain)?;
    if tty {
        let (rows, cols) = terminal_size().unwrap_or((24, 80));
        process.resize(rows, cols).await.map_err(chain)?;
    }
    if interactive {
        let p = process.clone();
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if p.write_stdin(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = p.close_stdin().await;
        });
    }
    let copy = |stream: Stream| {
        let p = process.clone();
        tokio::spawn(async move {
            while let Ok(Some(data)) = p.read(stream).await {
                let written = match stream {
                    Stream::Stdout => {
                        let mut out = std::io::stdout().lock();
                        out.write_all(&data).and_then(|()| out.flush())
                    }
                    Stream::Stderr => std::io::stderr().lock().write_all(&data),
                };
                if written.is_err() {
                    break;
                }
            }
        })
    };
    let outputs = [copy(Stream::Stdout), copy(Stream::Stderr)];
    let code = process.wait().await.map_err(chain)?;
    for task in outputs {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    Ok(u8::try_from(code & 0xff).unwrap_or(1))
}

/// Our terminal's size, if stdin is one.
fn terminal_size() -> Option<(u16, u16)> {
    let out = std::process::Command::new("stty")
        .arg("size")
        .stdin(Stdio::inherit())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// CRI log lines back to the stream each came from; partial (`P`) lines
/// joined with what follows.
fn print_log(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr().lock();
    for line in text.lines() {
        let mut parts = line.splitn(4, ' ');
        let (_ts, stream, tag, msg) = (
            parts.next(),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or("F"),
            parts.next().unwrap_or(""),
        );
        let end = if tag == "P" { "" } else { "\n" };
        let _ = if stream == "stderr" {
            write!(stderr, "{msg}{end}")
        } else {
            write!(stdout, "{msg}{end}")
        };
    }
}

fn print_status(s: &ContainerStatus) {
    out!("id:       {}", s.id);
    out!("sandbox:  {}", s.sandbox_id);
    out!("state:    {}", s.state);
    if let Some(code) = s.exit_code {
        out!("exit:     {code}");
    }
    if let Some(reason) = &s.reason {
        out!("reason:   {reason}");
    }
    if let Some(log) = &s.log_path {
        out!("log:      {}", log.display());
    }
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("bad path {}", path.display()))
}

fn parse_user(text: &str) -> anyhow::Result<(u32, u32)> {
    let (uid, gid) = text.split_once(':').unwrap_or((text, text));
    let num = |s: &str| {
        s.parse::<u32>()
            .with_context(|| format!("--user {text:?}: want UID[:GID] as numbers"))
    };
    Ok((num(uid)?, num(gid)?))
}

fn parse_mount(text: &str) -> anyhow::Result<Mount> {
    let parts: Vec<&str> = text.split(':').collect();
    let (source, destination, readonly) = match parts.as_slice() {
        [s, d] => (s, d, false),
        [s, d, "ro"] => (s, d, true),
        [s, d, "rw"] => (s, d, false),
        _ => bail!("--mount {text:?}: want HOST:CONTAINER[:ro]"),
    };
    Ok(Mount {
        source: absolute(Path::new(source))?,
        destination: destination.to_string(),
        readonly,
        propagation: Default::default(),
    })
}

fn parse_signal(text: &str) -> anyhow::Result<u32> {
    if let Ok(n) = text.parse::<u32>() {
        return Ok(n);
    }
    let name = text.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let sig = match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        "CONT" => 18,
        "STOP" => 19,
        _ => bail!("unknown signal {text:?}"),
    };
    Ok(sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_mounts_and_signals_parse() {
        assert_eq!(parse_user("1000").ok(), Some((1000, 1000)));
        assert_eq!(parse_user("1000:50").ok(), Some((1000, 50)));
        assert!(parse_user("root").is_err());
        let m = parse_mount("/srv:/data:ro").expect("mount");
        assert_eq!(
            (m.source.as_path(), m.destination.as_str(), m.readonly),
            (Path::new("/srv"), "/data", true)
        );
        assert!(parse_mount("/srv").is_err());
        assert!(parse_mount("/srv:/data:xx").is_err());
        assert_eq!(parse_signal("TERM").ok(), Some(15));
        assert_eq!(parse_signal("sigkill").ok(), Some(9));
        assert_eq!(parse_signal("2").ok(), Some(2));
        assert!(parse_signal("NOPE").is_err());
    }
}
