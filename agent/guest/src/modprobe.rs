//! `vc-agent` run as `modprobe` (the initramfs's `/sbin/modprobe` is a
//! symlink to `/init`): what the kernel's usermode helper starts for
//! `request_module`, as `modprobe -q -- <name-or-alias>`. Resolves the name
//! through the modules disk's indexes ([`crate::modules::Index`]), loads its
//! dependencies first, then it. Exit 0 when it is loaded (or built in, or was
//! already), 1 otherwise. Errors go to the kernel log (the helper has no
//! stdio), and to stderr when someone runs it by hand.

use std::{
    io::Write as _,
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use crate::modules::{self, Index, Resolved};

/// How long a request waits for the modules disk while the agent mounts it.
const DISK_WAIT: Duration = Duration::from_secs(10);

/// Whether the process was started as `modprobe`.
pub fn invoked() -> bool {
    std::env::args_os()
        .next()
        .is_some_and(|arg0| Path::new(&arg0).file_name() == Some(std::ffi::OsStr::new("modprobe")))
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    quiet: bool,
    name: String,
    params: String,
}

/// `modprobe [-q] [-v] [-b] [-s] [--] NAME [PARAM=VALUE...]`: the options the
/// kernel and kmod users pass; anything else is refused.
fn parse(args: &[String]) -> Result<Request, String> {
    let mut quiet = false;
    let mut rest = Vec::new();
    let mut options = true;
    for arg in args {
        if options && arg == "--" {
            options = false;
        } else if options && arg.starts_with("--") {
            match arg.as_str() {
                "--quiet" => quiet = true,
                "--verbose" | "--use-blacklist" | "--syslog" => {}
                other => return Err(format!("unsupported option {other}")),
            }
        } else if options && arg.len() > 1 && arg.starts_with('-') {
            for flag in arg.chars().skip(1) {
                match flag {
                    'q' => quiet = true,
                    'v' | 'b' | 's' => {}
                    other => return Err(format!("unsupported option -{other}")),
                }
            }
        } else {
            rest.push(arg.clone());
        }
    }
    let mut rest = rest.into_iter();
    let name = rest.next().ok_or("no module name given")?;
    Ok(Request {
        quiet,
        name,
        params: rest.collect::<Vec<_>>().join(" "),
    })
}

pub fn main() -> ExitCode {
    // Whether fd 2 leads anywhere, before opening anything reuses it.
    let stderr_open = nix::fcntl::fcntl(2, nix::fcntl::FcntlArg::F_GETFD).is_ok();
    let log = |msg: &str| report(stderr_open, msg);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let request = match parse(&args) {
        Ok(r) => r,
        Err(err) => {
            log(&format!(
                "{err} (usage: modprobe [-q] [--] NAME [PARAM=VALUE...])"
            ));
            return ExitCode::from(1);
        }
    };
    match run(&request) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::NotFound(_)) if request.quiet => ExitCode::from(1),
        Err(Failure::NotFound(msg) | Failure::Other(msg)) => {
            log(&msg);
            ExitCode::from(1)
        }
    }
}

#[derive(Debug)]
enum Failure {
    /// No such module or alias (kmod's `-q` silences only this).
    NotFound(String),
    Other(String),
}

fn run(request: &Request) -> Result<(), Failure> {
    let name = &request.name;
    if is_live(name) {
        return Ok(());
    }
    let release = nix::sys::utsname::uname()
        .map_err(|e| Failure::Other(format!("uname: {e}")))?
        .release()
        .to_string_lossy()
        .into_owned();
    let dir = Path::new("/lib/modules").join(&release);
    wait_for_disk(&dir, Path::new(crate::modules_disk::PENDING), DISK_WAIT)
        .map_err(Failure::Other)?;
    let index = Index::open(&dir).map_err(|e| Failure::Other(format!("{}: {e}", dir.display())))?;
    match index.resolve(name) {
        None => Err(Failure::NotFound(format!(
            "module {name} not found in {}",
            dir.display()
        ))),
        Some(Resolved::Builtin(_)) => Ok(()),
        Some(Resolved::Load(paths)) => {
            let last = paths.len().saturating_sub(1);
            for (i, rel) in paths.iter().enumerate() {
                let params = if i == last {
                    request.params.as_str()
                } else {
                    ""
                };
                modules::load(&dir.join(rel), params)
                    .map_err(|e| Failure::Other(format!("{name}: {e:#}")))?;
            }
            Ok(())
        }
    }
}

/// A module of that name is loaded and initialised already.
fn is_live(name: &str) -> bool {
    let module = name.replace('-', "_");
    if module.contains('/') || module.starts_with('.') {
        return false;
    }
    std::fs::read_to_string(Path::new("/sys/module").join(module).join("initstate"))
        .is_ok_and(|s| s.trim() == "live")
}

/// Waits until `dir` has `modules.dep`: at once if it has; up to `limit`
/// while `pending` exists (the agent is mounting the disk); an error
/// otherwise.
fn wait_for_disk(dir: &Path, pending: &Path, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        if dir.join("modules.dep").is_file() {
            return Ok(());
        }
        if !pending.exists() {
            return Err(format!(
                "{} has no modules.dep: the modules disk is not mounted",
                dir.display()
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the modules disk was not mounted at {} within {}s",
                dir.display(),
                limit.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// To the kernel log at error level (it reaches the console), and to stderr
/// if that is open.
fn report(stderr_open: bool, msg: &str) {
    if let Ok(mut kmsg) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = kmsg.write_all(format!("<3>vc-modprobe: {msg}").as_bytes());
    }
    if stderr_open {
        let _ = writeln!(std::io::stderr(), "modprobe: {msg}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_kernels_command_line_parses() {
        assert_eq!(
            parse(&args(&["-q", "--", "rtnl-link-bridge"])),
            Ok(Request {
                quiet: true,
                name: "rtnl-link-bridge".into(),
                params: String::new()
            })
        );
        assert_eq!(
            parse(&args(&["-qv", "dummy", "numdummies=2", "x=1"])),
            Ok(Request {
                quiet: true,
                name: "dummy".into(),
                params: "numdummies=2 x=1".into()
            })
        );
        let plain = parse(&args(&["bridge"])).expect("plain");
        assert!(!plain.quiet);
        assert_eq!(
            parse(&args(&["--", "-odd"])).map(|r| r.name),
            Ok("-odd".to_string())
        );
        assert!(parse(&args(&["-r", "bridge"])).is_err());
        assert!(parse(&args(&["--remove", "bridge"])).is_err());
        assert!(parse(&args(&["-q", "--"])).is_err());
    }

    #[test]
    fn waiting_for_the_disk_is_bounded_and_only_while_it_is_pending() {
        let dir = tempfile::tempdir().expect("tempdir");
        let modules = dir.path().join("6.1.0-1-amd64");
        std::fs::create_dir(&modules).expect("mkdir");
        let pending = dir.path().join("pending");
        let started = Instant::now();
        let err = wait_for_disk(&modules, &pending, Duration::from_secs(10)).expect_err("absent");
        assert!(err.contains("not mounted"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no wait without pending"
        );
        std::fs::write(&pending, b"").expect("pending");
        let err =
            wait_for_disk(&modules, &pending, Duration::from_millis(100)).expect_err("timeout");
        assert!(err.contains("within"), "{err}");
        let dep = modules.join("modules.dep");
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            std::fs::write(dep, b"").expect("write");
        });
        wait_for_disk(&modules, &pending, Duration::from_secs(10)).expect("appears");
        writer.join().expect("writer");
    }

    #[test]
    fn names_with_path_parts_are_never_live() {
        assert!(!is_live("../x"));
        assert!(!is_live("a/b"));
    }
}
