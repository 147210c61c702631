//! Kernel modules: loading one `.ko` file (the boot lists and modprobe share
//! this), and resolving a name or alias to the files to load, through
//! depmod's indexes as kmod does (`modules.dep`, `modules.alias`,
//! `modules.builtin`, `modules.builtin.modinfo`).

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    path::Path,
};

use anyhow::Context as _;

/// Loads the module in `path` with `params`; `Ok(false)` if it was loaded
/// already. Compressed modules (`.ko.xz`, `.ko.zst`, `.ko.gz`) are handed
/// to the kernel to decompress (`MODULE_INIT_COMPRESSED_FILE`); Debian's
/// kernel ships them uncompressed.
pub fn load(path: &Path, params: &str) -> anyhow::Result<bool> {
    let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let params = std::ffi::CString::new(params)
        .with_context(|| format!("parameters for {}", path.display()))?;
    let name = path.to_string_lossy();
    let flags = if [".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .any(|ext| name.ends_with(ext))
    {
        nix::kmod::ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE)
    } else {
        nix::kmod::ModuleInitFlags::empty()
    };
    match nix::kmod::finit_module(&file, &params, flags) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::EEXIST) => Ok(false),
        Err(errno) => Err(errno).with_context(|| format!("load module {}", path.display())),
    }
}

/// `include/uapi/linux/module.h`; nix does not name it.
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// What a name or alias resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// Part of the kernel image: nothing to load.
    Builtin(String),
    /// Files to load in this order (dependencies first), relative to the
    /// modules directory. One per module; several when an alias matches
    /// more than one module (kmod loads them all).
    Load(Vec<String>),
}

/// depmod's text indexes of one kernel release.
#[derive(Debug, Default)]
pub struct Index {
    /// Module path → the paths it depends on, as `modules.dep` lists them.
    deps: HashMap<String, Vec<String>>,
    /// Normalised module name → its path.
    by_name: HashMap<String, String>,
    /// Normalised alias pattern → module name, in file order.
    aliases: Vec<(String, String)>,
    /// Normalised names of built-in modules.
    builtin: HashSet<String>,
    /// Normalised alias pattern → built-in module name.
    builtin_aliases: Vec<(String, String)>,
}

impl Index {
    /// Reads the indexes in `dir` (`/lib/modules/<release>`). `modules.dep`
    /// must exist; the others may be missing (an older depmod, a kernel
    /// without built-in modinfo).
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let read = |name: &str| std::fs::read(dir.join(name));
        let optional = |name: &str| match read(name) {
            Ok(bytes) => Ok(bytes),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(err) => Err(err),
        };
        Ok(Self::parse(
            &String::from_utf8_lossy(&read("modules.dep")?),
            &String::from_utf8_lossy(&optional("modules.alias")?),
            &String::from_utf8_lossy(&optional("modules.builtin")?),
            &optional("modules.builtin.modinfo")?,
        ))
    }

    /// From the files' contents. `modinfo` is `modules.builtin.modinfo`:
    /// NUL-separated `module.key=value` records.
    pub fn parse(dep: &str, alias: &str, builtin: &str, modinfo: &[u8]) -> Self {
        let mut index = Self::default();
        for line in dep.lines() {
            let Some((path, rest)) = line.split_once(':') else {
                continue;
            };
            let path = path.trim().to_string();
            index.by_name.insert(module_name(&path), path.clone());
            index
                .deps
                .insert(path, rest.split_whitespace().map(str::to_string).collect());
        }
        for line in alias.lines() {
            let mut words = line.split_whitespace();
            if let (Some("alias"), Some(pattern), Some(module)) =
                (words.next(), words.next(), words.next())
            {
                index.aliases.push((normalize(pattern), normalize(module)));
            }
        }
        for line in builtin.lines().map(str::trim).filter(|l| !l.is_empty()) {
            index.builtin.insert(module_name(line));
        }
        for record in modinfo.split(|b| *b == 0) {
            let record = String::from_utf8_lossy(record);
            let Some((module, value)) = record.split_once(".alias=") else {
                continue;
            };
            if !module.contains('=') {
                index
                    .builtin_aliases
                    .push((normalize(value), normalize(module)));
            }
        }
        index
    }

    /// Resolves `wanted` as kmod does: a module's own name first, then a
    /// built-in module's, then the aliases of loadable modules (glob
    /// patterns), then those of built-in ones. `None`: nothing matches.
    pub fn resolve(&self, wanted: &str) -> Option<Resolved> {
        let name = normalize(wanted);
        if let Some(path) = self.by_name.get(&name) {
            return Some(Resolved::Load(self.load_order(&[path.as_str()])));
        }
        if self.builtin.contains(&name) {
            return Some(Resolved::Builtin(name));
        }
        let mut matched: Vec<&str> = Vec::new();
        for (pattern, module) in &self.aliases {
            if glob_match(pattern, &name) {
                if let Some(path) = self.by_name.get(module) {
                    if !matched.contains(&path.as_str()) {
                        matched.push(path);
                    }
                } else if self.builtin.contains(module) {
                    return Some(Resolved::Builtin(module.clone()));
                }
            }
        }
        if !matched.is_empty() {
            return Some(Resolved::Load(self.load_order(&matched)));
        }
        self.builtin_aliases
            .iter()
            .find(|(pattern, _)| glob_match(pattern, &name))
            .map(|(_, module)| Resolved::Builtin(module.clone()))
    }

    /// `paths` and their dependencies, each once, every dependency before
    /// the modules that need it. `modules.dep` lists a module's whole
    /// closure with the most basic last, so walking it backwards (and each
    /// dependency's own list first) loads bottom-up, as kmod and
    /// `build-guest.sh` do.
    fn load_order(&self, paths: &[&str]) -> Vec<String> {
        fn visit<'a>(
            index: &'a Index,
            path: &'a str,
            seen: &mut HashSet<&'a str>,
            order: &mut Vec<String>,
        ) {
            if !seen.insert(path) {
                return;
            }
            if let Some(deps) = index.deps.get(path) {
                for dep in deps.iter().rev() {
                    visit(index, dep, seen, order);
                }
            }
            order.push(path.to_string());
        }
        let mut seen = HashSet::new();
        let mut order = Vec::new();
        for path in paths {
            visit(self, path, &mut seen, &mut order);
        }
        order
    }
}

/// `kernel/net/bridge/bridge.ko` → `bridge`; `snd-pcm.ko.xz` → `snd_pcm`.
fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base.split(".ko").next().unwrap_or(base);
    normalize(stem)
}

/// kmod's alias_normalize: `-` and `_` are the same, except inside a
/// bracket expression of a pattern.
fn normalize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_bracket = false;
    for c in s.chars() {
        match c {
            '[' => in_bracket = true,
            ']' => in_bracket = false,
            '-' if !in_bracket => {
                out.push('_');
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

/// fnmatch(3) without flags, as kmod matches `modules.alias` patterns: `*`,
/// `?`, bracket expressions (`[abc]`, `[a-z]`, `[!x]`, `[^x]`), `\` escapes.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative with one backtrack point: the last `*` seen.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        let step = match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
                continue;
            }
            Some('?') => Some(1),
            Some('[') => match bracket(&p[pi..], t[ti]) {
                Some((true, len)) => Some(len),
                Some((false, _)) => None,
                // An unclosed `[` is a literal.
                None => (t[ti] == '[').then_some(1),
            },
            Some('\\') if pi + 1 < p.len() => (p[pi + 1] == t[ti]).then_some(2),
            Some(c) => (*c == t[ti]).then_some(1),
            None => None,
        };
        match step {
            Some(len) => {
                pi += len;
                ti += 1;
            }
            None => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Matches `c` against the bracket expression at the start of `p`:
/// (matched, the expression's length), or `None` if it is not closed.
fn bracket(p: &[char], c: char) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(i), Some('!' | '^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let lo = *p.get(i)?;
        if lo == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|hi| *hi != ']') {
            let hi = p[i + 2];
            matched |= lo <= c && c <= hi;
            i += 3;
        } else {
            matched |= lo == c;
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trimmed copy of Debian 6.1's indexes: bridge needs stp and llc,
    /// stp needs llc; an alias pattern per kind the kernel asks for.
    const DEP: &str = "\
kernel/net/802/stp.ko: kernel/net/llc/llc.ko
kernel/net/llc/llc.ko:
kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko
kernel/net/bridge/br_netfilter.ko: kernel/net/bridge/bridge.ko kernel/net/802/stp.ko kernel/net/llc/llc.ko
kernel/drivers/net/dummy.ko:
kernel/fs/fat/vfat.ko.xz: kernel/fs/fat/fat.ko.xz
kernel/fs/fat/fat.ko.xz:
kernel/net/sctp/sctp.ko: kernel/lib/libcrc32c.ko kernel/net/udp_tunnel.ko
kernel/lib/libcrc32c.ko:
kernel/net/udp_tunnel.ko:
kernel/drivers/virtio/virtio_pci-modern.ko:
";
    const ALIAS: &str = "\
# Aliases extracted from modules themselves.
alias rtnl-link-bridge bridge
alias net-pf-7 bridge
alias rtnl-link-dummy dummy
alias fs-vfat vfat
alias net-pf-2-proto-132 sctp
alias net-pf-10-proto-132 sctp
alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci_modern
alias char-major-10-23[0-7] dummy
alias fs-ext4 ext4
";
    const BUILTIN: &str = "kernel/fs/ext4/ext4.ko\nkernel/net/unix/unix.ko\n";
    const MODINFO: &[u8] =
        b"unix.license=GPL\0unix.alias=net-pf-1\0ext4.alias=fs-ext3\0ext4.description=x\0";

    fn index() -> Index {
        Index::parse(DEP, ALIAS, BUILTIN, MODINFO)
    }

    fn load(paths: &[&str]) -> Option<Resolved> {
        Some(Resolved::Load(
            paths.iter().map(|p| p.to_string()).collect(),
        ))
    }

    #[test]
    fn globs_match_as_fnmatch() {
        assert!(glob_match("net_pf_10_proto_132", "net_pf_10_proto_132"));
        assert!(!glob_match("net_pf_1", "net_pf_10"));
        assert!(glob_match(
            "pci:v00001AF4d*sv*sd*bc*sc*i*",
            "pci:v00001AF4d00001041sv00001AF4sd00001100bc02sc00i00"
        ));
        assert!(!glob_match(
            "pci:v00001AF4d*sv*",
            "pci:v00008086d00001041sv0"
        ));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXbYbZc"));
        assert!(!glob_match("a*b*c", "aXbYbZ"));
        assert!(glob_match("x[0-7]", "x5"));
        assert!(!glob_match("x[0-7]", "x8"));
        assert!(glob_match("x[!0-7]", "x8"));
        assert!(glob_match("x[^ab]", "xc"));
        assert!(!glob_match("x[^ab]", "xa"));
        assert!(glob_match("x[]]", "x]"));
        assert!(glob_match("x[", "x["));
        assert!(glob_match(r"a\*", "a*"));
        assert!(!glob_match(r"a\*", "ab"));
    }

    #[test]
    fn names_dashes_and_underscores_are_one() {
        assert_eq!(normalize("rtnl-link-bridge"), "rtnl_link_bridge");
        assert_eq!(normalize("char-major-10-23[0-7]"), "char_major_10_23[0-7]");
        assert_eq!(module_name("kernel/fs/fat/vfat.ko.xz"), "vfat");
        assert_eq!(
            module_name("kernel/drivers/virtio/virtio_pci-modern.ko"),
            "virtio_pci_modern"
        );
    }

    #[test]
    fn a_module_loads_after_its_dependencies() {
        let index = index();
        let bridge = load(&[
            "kernel/net/llc/llc.ko",
            "kernel/net/802/stp.ko",
            "kernel/net/bridge/bridge.ko",
        ]);
        assert_eq!(index.resolve("bridge"), bridge);
        assert_eq!(
            index.resolve("br_netfilter"),
            load(&[
                "kernel/net/llc/llc.ko",
                "kernel/net/802/stp.ko",
                "kernel/net/bridge/bridge.ko",
                "kernel/net/bridge/br_netfilter.ko",
            ])
        );
        assert_eq!(index.resolve("llc"), load(&["kernel/net/llc/llc.ko"]));
        assert_eq!(
            index.resolve("vfat"),
            load(&["kernel/fs/fat/fat.ko.xz", "kernel/fs/fat/vfat.ko.xz"])
        );
        assert_eq!(
            index.resolve("virtio-pci-modern"),
            load(&["kernel/drivers/virtio/virtio_pci-modern.ko"])
        );
    }

    #[test]
    fn aliases_resolve_to_their_modules() {
        let index = index();
        let bridge = load(&[
            "kernel/net/llc/llc.ko",
            "kernel/net/802/stp.ko",
            "kernel/net/bridge/bridge.ko",
        ]);
        assert_eq!(index.resolve("rtnl-link-bridge"), bridge);
        assert_eq!(index.resolve("rtnl_link_bridge"), bridge);
        assert_eq!(index.resolve("net-pf-7"), bridge);
        assert_eq!(index.resolve("fs-vfat"), index.resolve("vfat"));
        assert_eq!(
            index.resolve("net-pf-10-proto-132"),
            load(&[
                "kernel/net/udp_tunnel.ko",
                "kernel/lib/libcrc32c.ko",
                "kernel/net/sctp/sctp.ko"
            ])
        );
        assert_eq!(
            index.resolve("pci:v00001AF4d00001041sv00001AF4sd00001100bc02sc00i00"),
            load(&["kernel/drivers/virtio/virtio_pci-modern.ko"])
        );
        assert_eq!(
            index.resolve("char-major-10-235"),
            load(&["kernel/drivers/net/dummy.ko"])
        );
        assert_eq!(index.resolve("char-major-10-238"), None);
        assert_eq!(index.resolve("net-pf-99"), None);
        assert_eq!(index.resolve("nosuchmodule"), None);
    }

    #[test]
    fn builtin_modules_and_their_aliases_need_no_loading() {
        let index = index();
        assert_eq!(
            index.resolve("ext4"),
            Some(Resolved::Builtin("ext4".into()))
        );
        assert_eq!(
            index.resolve("fs-ext4"),
            Some(Resolved::Builtin("ext4".into()))
        );
        assert_eq!(
            index.resolve("fs-ext3"),
            Some(Resolved::Builtin("ext4".into()))
        );
        assert_eq!(
            index.resolve("net-pf-1"),
            Some(Resolved::Builtin("unix".into()))
        );
    }

    #[test]
    fn an_alias_matching_several_modules_loads_each_once() {
        let index = Index::parse(
            DEP,
            "alias pci:v1* dummy\nalias pci:v1* bridge\nalias pci:* dummy\n",
            "",
            b"",
        );
        assert_eq!(
            index.resolve("pci:v1234"),
            load(&[
                "kernel/drivers/net/dummy.ko",
                "kernel/net/llc/llc.ko",
                "kernel/net/802/stp.ko",
                "kernel/net/bridge/bridge.ko",
            ])
        );
    }

    #[test]
    fn indexes_are_read_from_a_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(Index::open(dir.path()).is_err(), "modules.dep is required");
        std::fs::write(dir.path().join("modules.dep"), DEP).expect("write");
        let bare = Index::open(dir.path()).expect("only modules.dep");
        assert_eq!(bare.resolve("rtnl-link-bridge"), None);
        std::fs::write(dir.path().join("modules.alias"), ALIAS).expect("write");
        std::fs::write(dir.path().join("modules.builtin"), BUILTIN).expect("write");
        std::fs::write(dir.path().join("modules.builtin.modinfo"), MODINFO).expect("write");
        let full = Index::open(dir.path()).expect("all");
        assert_eq!(full.resolve("rtnl-link-bridge"), index().resolve("bridge"));
        assert_eq!(
            full.resolve("net-pf-1"),
            Some(Resolved::Builtin("unix".into()))
        );
    }

    #[test]
    fn a_missing_module_file_is_an_error_naming_it() {
        let err = super::load(Path::new("/nonexistent/x.ko"), "").expect_err("missing");
        assert!(format!("{err:#}").contains("/nonexistent/x.ko"), "{err:#}");
    }
}
