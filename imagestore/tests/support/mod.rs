//! Test support: a real `docker-registry` on a free loopback port, a tiny push
//! client, layer/image builders and a model of the expected rootfs.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use imagestore::Digest;
use serde_json::json;

/// A registry process with its own storage; killed and removed on drop.
pub struct Registry {
    child: Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub auth: Option<(String, String)>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Registry {
    pub async fn start() -> Registry {
        Self::start_with(None).await
    }

    /// With basic auth (a bcrypt htpasswd file) when `auth` is given.
    pub async fn start_with(auth: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((u, p)) = auth {
            let hash = bcrypt::hash(p, 4).unwrap();
            let htp = dir.path().join("htpasswd");
            std::fs::write(&htp, format!("{u}:{hash}\n")).unwrap();
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: test-realm\n    path: {}\n",
                htp.display()
            ));
        }
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&cfg_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("docker-registry (Debian package docker-registry) must be installed");
        let mut reg = Registry {
            child,
            dir,
            port,
            auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
        };
        let url = format!("http://127.0.0.1:{port}/v2/");
        for _ in 0..200 {
            if let Ok(r) = reqwest::get(&url).await {
                if r.status().as_u16() == 200 || r.status().as_u16() == 401 {
                    return reg;
                }
            }
            assert!(
                reg.child.try_wait().unwrap().is_none(),
                "registry exited: {}",
                std::fs::read_to_string(reg.dir.path().join("registry.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("registry did not start on port {port}");
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.host())
    }

    fn req(&self, m: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let r = reqwest::Client::new().request(m, url);
        match &self.auth {
            Some((u, p)) => r.basic_auth(u, Some(p)),
            None => r,
        }
    }

    pub async fn push_blob(&self, repo: &str, data: &[u8]) -> Digest {
        let digest = Digest::of(data);
        let r = self
            .req(
                reqwest::Method::POST,
                &format!("{}/v2/{repo}/blobs/uploads/", self.base()),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            202,
            "start upload: {:?}",
            r.text().await
        );
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let loc = if loc.starts_with("http") {
            loc
        } else {
            format!("{}{loc}", self.base())
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = self
            .req(reqwest::Method::PUT, &format!("{loc}{sep}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            201,
            "finish upload: {:?}",
            r.text().await
        );
        digest
    }

    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        data: &[u8],
    ) -> Digest {
        let r = self
            .req(
                reqwest::Method::PUT,
                &format!("{}/v2/{repo}/manifests/{reference}", self.base()),
            )
            .header("content-type", media_type)
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            201,
            "push manifest: {:?}",
            r.text().await
        );
        Digest::of(data)
    }

    /// Pushes an image; returns (manifest digest, config digest = image ID, manifest bytes len).
    pub async fn push_image(&self, repo: &str, tag: &str, image: &TestImage) -> Pushed {
        let mut layer_descs = Vec::new();
        let mut diff_ids = Vec::new();
        for l in &image.layers {
            let blob = l.blob();
            let d = self.push_blob(repo, &blob).await;
            layer_descs.push(
                json!({"mediaType": l.media_type(), "digest": d.to_string(), "size": blob.len()}),
            );
            diff_ids.push(Digest::of(&l.tar).to_string());
        }
        let config = serde_json::to_vec(&json!({
            "architecture": image.arch, "os": "linux",
            "config": image.config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap();
        let config_digest = self.push_blob(repo, &config).await;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": image.manifest_type,
            "config": {"mediaType": if image.manifest_type.contains("docker") {
                "application/vnd.docker.container.image.v1+json" } else { "application/vnd.oci.image.config.v1+json" },
                "digest": config_digest.to_string(), "size": config.len()},
            "layers": layer_descs,
        }))
        .unwrap();
        let manifest_digest = self
            .push_manifest(repo, tag, &image.manifest_type, &manifest)
            .await;
        Pushed {
            manifest: manifest_digest,
            manifest_size: manifest.len(),
            config: config_digest,
            layers: image.layers.iter().map(|l| Digest::of(&l.blob())).collect(),
        }
    }

    /// Pushes an index of already pushed manifests (platform → pushed).
    pub async fn push_index(&self, repo: &str, tag: &str, entries: &[(&str, &Pushed)]) -> Digest {
        let manifests: Vec<_> = entries
            .iter()
            .map(|(arch, p)| {
                json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": p.manifest.to_string(), "size": p.manifest_size,
                "platform": {"architecture": arch, "os": "linux"}})
            })
            .collect();
        let index = serde_json::to_vec(&json!({"schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}))
        .unwrap();
        self.push_manifest(repo, tag, "application/vnd.oci.image.index.v1+json", &index)
            .await
    }

    /// The stored file of a blob in the registry's filesystem storage.
    pub fn blob_data_path(&self, d: &Digest) -> PathBuf {
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&d.hex()[..2])
            .join(d.hex())
            .join("data")
    }

    /// How many times a blob was fetched with GET (from the access log).
    pub fn blob_gets(&self, d: &Digest) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap();
        let needle = format!("/blobs/{d}");
        log.lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&needle) && l.contains(" 200 "))
            .count()
    }
}

#[derive(Debug, Clone)]
pub struct Pushed {
    pub manifest: Digest,
    pub manifest_size: usize,
    pub config: Digest,
    pub layers: Vec<Digest>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comp {
    None,
    Gzip,
    Zstd,
}

/// One layer: its uncompressed tar and how it is pushed.
#[derive(Debug, Clone)]
pub struct TestLayer {
    pub tar: Vec<u8>,
    pub comp: Comp,
    pub docker: bool,
}

impl TestLayer {
    pub fn blob(&self) -> Vec<u8> {
        match self.comp {
            Comp::None => self.tar.clone(),
            Comp::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&self.tar).unwrap();
                e.finish().unwrap()
            }
            Comp::Zstd => zstd::encode_all(&self.tar[..], 3).unwrap(),
        }
    }

    pub fn media_type(&self) -> &'static str {
        match (self.comp, self.docker) {
            (Comp::Gzip, true) => "application/vnd.docker.image.rootfs.diff.tar.gzip",
            (Comp::None, _) => "application/vnd.oci.image.layer.v1.tar",
            (Comp::Gzip, false) => "application/vnd.oci.image.layer.v1.tar+gzip",
            (Comp::Zstd, _) => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

#[derive(Debug, Clone)]
pub struct TestImage {
    pub layers: Vec<TestLayer>,
    pub config: serde_json::Value,
    pub arch: String,
    pub manifest_type: String,
}

impl TestImage {
    pub fn new(layers: Vec<TestLayer>) -> Self {
        TestImage {
            layers,
            config: json!({"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "User": "1000:1000", "WorkingDir": "/", "StopSignal": "SIGQUIT"}),
            arch: "amd64".into(),
            manifest_type: "application/vnd.oci.image.manifest.v1+json".into(),
        }
    }
}

/// A layer entry, also the model of what the rootfs must contain.
#[derive(Debug, Clone)]
pub enum E {
    Dir(&'static str, u32, u32),
    File(&'static str, u32, u32, Vec<u8>),
    Symlink(&'static str, &'static str),
    Hardlink(&'static str, &'static str),
    Char(&'static str, u32, u32),
    Fifo(&'static str),
    Whiteout(&'static str),
    Opaque(&'static str),
    /// A raw entry with any path and link name (hostile layers).
    Raw(Vec<u8>, tar::EntryType, Vec<u8>, Vec<u8>),
    /// A file with a PAX xattr.
    XattrFile(&'static str, &'static str, &'static [u8]),
}

fn raw_header(
    path: &[u8],
    kind: tar::EntryType,
    link: &[u8],
    size: u64,
    mode: u32,
    uid: u64,
) -> tar::Header {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..path.len()].copy_from_slice(path);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    h
}

pub fn layer(entries: &[E], comp: Comp) -> TestLayer {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            E::Dir(p, mode, uid) => {
                let h = raw_header(
                    format!("{p}/").as_bytes(),
                    tar::EntryType::Directory,
                    b"",
                    0,
                    *mode,
                    *uid as u64,
                );
                b.append(&h, &[][..]).unwrap();
            }
            E::File(p, mode, uid, data) => {
                let h = raw_header(
                    p.as_bytes(),
                    tar::EntryType::Regular,
                    b"",
                    data.len() as u64,
                    *mode,
                    *uid as u64,
                );
                b.append(&h, &data[..]).unwrap();
            }
            E::Symlink(p, t) => {
                let h = raw_header(
                    p.as_bytes(),
                    tar::EntryType::Symlink,
                    t.as_bytes(),
                    0,
                    0o777,
                    0,
                );
                b.append(&h, &[][..]).unwrap();
            }
            E::Hardlink(p, t) => {
                let h = raw_header(
                    p.as_bytes(),
                    tar::EntryType::Link,
                    t.as_bytes(),
                    0,
                    0o644,
                    0,
                );
                b.append(&h, &[][..]).unwrap();
            }
            E::Char(p, maj, min) => {
                let mut h = tar::Header::new_ustar();
                h.set_path(p).unwrap();
                h.set_entry_type(tar::EntryType::Char);
                h.set_device_major(*maj).unwrap();
                h.set_device_minor(*min).unwrap();
                h.set_mode(0o666);
                h.set_uid(0);
                h.set_gid(0);
                h.set_mtime(1_700_000_000);
                h.set_size(0);
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::Fifo(p) => {
                let h = raw_header(p.as_bytes(), tar::EntryType::Fifo, b"", 0, 0o600, 0);
                b.append(&h, &[][..]).unwrap();
            }
            E::Whiteout(p) => {
                let (dir, name) = p.rsplit_once('/').map_or(("", *p), |(d, n)| (d, n));
                let wp = if dir.is_empty() {
                    format!(".wh.{name}")
                } else {
                    format!("{dir}/.wh.{name}")
                };
                let h = raw_header(wp.as_bytes(), tar::EntryType::Regular, b"", 0, 0o600, 0);
                b.append(&h, &[][..]).unwrap();
            }
            E::Opaque(d) => {
                let h = raw_header(
                    format!("{d}/.wh..wh..opq").as_bytes(),
                    tar::EntryType::Regular,
                    b"",
                    0,
                    0o600,
                    0,
                );
                b.append(&h, &[][..]).unwrap();
            }
            E::Raw(p, kind, link, data) => {
                let h = raw_header(p, *kind, link, data.len() as u64, 0o644, 0);
                b.append(&h, &data[..]).unwrap();
            }
            E::XattrFile(p, key, value) => {
                b.append_pax_extensions([(format!("SCHILY.xattr.{key}").as_str(), *value)])
                    .unwrap();
                let h = raw_header(p.as_bytes(), tar::EntryType::Regular, b"", 3, 0o644, 0);
                b.append(&h, &b"xyz"[..]).unwrap();
            }
        }
    }
    TestLayer {
        tar: b.into_inner().unwrap(),
        comp,
        docker: false,
    }
}

/// What a path must be in the merged rootfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    Dir { mode: u32, uid: u32 },
    File { mode: u32, uid: u32, data: Vec<u8> },
    Symlink(String),
    Char(u32, u32),
    Fifo,
}

/// The expected merged tree of some layers (whiteouts applied); hardlinks
/// become copies of their target here and are checked separately by inode.
pub fn model(layers: &[&[E]]) -> BTreeMap<String, Want> {
    let mut m: BTreeMap<String, Want> = BTreeMap::new();
    for entries in layers {
        for e in entries.iter() {
            let remove_under = |m: &mut BTreeMap<String, Want>, p: &str, keep_self: bool| {
                let prefix = format!("{p}/");
                m.retain(|k, _| !(k.starts_with(&prefix) || (!keep_self && k == p)));
            };
            match e {
                E::Dir(p, mode, uid) => {
                    if !matches!(m.get(*p), Some(Want::Dir { .. })) {
                        remove_under(&mut m, p, false);
                    }
                    m.insert(
                        p.to_string(),
                        Want::Dir {
                            mode: *mode,
                            uid: *uid,
                        },
                    );
                }
                E::File(p, mode, uid, data) => {
                    remove_under(&mut m, p, false);
                    m.insert(
                        p.to_string(),
                        Want::File {
                            mode: *mode,
                            uid: *uid,
                            data: data.clone(),
                        },
                    );
                }
                E::XattrFile(p, _, _) => {
                    m.insert(
                        p.to_string(),
                        Want::File {
                            mode: 0o644,
                            uid: 0,
                            data: b"xyz".to_vec(),
                        },
                    );
                }
                E::Symlink(p, t) => {
                    m.insert(p.to_string(), Want::Symlink(t.to_string()));
                }
                E::Hardlink(p, t) => {
                    let w = m.get(*t).cloned().unwrap();
                    m.insert(p.to_string(), w);
                }
                E::Char(p, a, b) => {
                    m.insert(p.to_string(), Want::Char(*a, *b));
                }
                E::Fifo(p) => {
                    m.insert(p.to_string(), Want::Fifo);
                }
                E::Whiteout(p) => remove_under(&mut m, p, false),
                E::Opaque(d) => remove_under(&mut m, d, true),
                E::Raw(..) => {}
            }
        }
    }
    m
}

/// Reads a tree back as the model sees it (relative paths, no root entry).
pub fn read_tree(root: &Path) -> BTreeMap<String, Want> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if rel == "lost+found" {
                continue;
            }
            let md = std::fs::symlink_metadata(&path).unwrap();
            let ft = md.file_type();
            let w = if ft.is_dir() {
                stack.push(path.clone());
                Want::Dir {
                    mode: md.mode() & 0o7777,
                    uid: md.uid(),
                }
            } else if ft.is_symlink() {
                Want::Symlink(
                    std::fs::read_link(&path)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                )
            } else if ft.is_char_device() {
                let rdev = md.rdev();
                Want::Char(
                    ((rdev >> 8) & 0xfff) as u32,
                    ((rdev & 0xff) | ((rdev >> 12) & 0xfff00)) as u32,
                )
            } else if ft.is_fifo() {
                Want::Fifo
            } else {
                Want::File {
                    mode: md.mode() & 0o7777,
                    uid: md.uid(),
                    data: std::fs::read(&path).unwrap(),
                }
            };
            out.insert(rel, w);
        }
    }
    out
}

/// A busybox image layer: /bin/busybox (busybox-static) and applet symlinks.
pub fn busybox_entries() -> Vec<E> {
    let bin = std::fs::read("/bin/busybox").expect("busybox-static must be installed");
    let out = Command::new("/bin/busybox").arg("--list").output().unwrap();
    let mut entries = vec![
        E::Dir("bin", 0o755, 0),
        E::File("bin/busybox", 0o755, 0, bin),
        E::Dir("etc", 0o755, 0),
        E::File(
            "etc/passwd",
            0o644,
            0,
            b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n".to_vec(),
        ),
        E::Dir("tmp", 0o1777, 0),
    ];
    for applet in String::from_utf8(out.stdout).unwrap().lines() {
        if applet != "busybox" && !applet.is_empty() {
            let p: &'static str = Box::leak(format!("bin/{applet}").into_boxed_str());
            entries.push(E::Symlink(p, "busybox"));
        }
    }
    entries
}

/// A mount that is unmounted on drop.
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A host directory outside any store, for checking hostile layers leave it untouched.
pub fn host_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("imagestore-host-")
        .tempdir()
        .unwrap()
}

/// A store in a fresh temp dir; the guard unmounts container rootfs left behind.
pub struct StoreDir {
    pub dir: tempfile::TempDir,
}

impl StoreDir {
    pub fn new() -> StoreDir {
        StoreDir {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    pub fn config(&self) -> imagestore::StoreConfig {
        imagestore::StoreConfig {
            root: self.dir.path().to_path_buf(),
            ..Default::default()
        }
    }
}

impl Drop for StoreDir {
    fn drop(&mut self) {
        let containers = self.dir.path().join("containers");
        if let Ok(rd) = std::fs::read_dir(&containers) {
            for e in rd.flatten() {
                for mount in ["rootfs", "layer"] {
                    let _ = Command::new("umount")
                        .arg(e.path().join(mount))
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
    }
}

/// A bearer-token front for a registry, like Docker Hub's: `/v2/...` needs
/// `Bearer <token>`, else 401 with a challenge naming `/token`, which hands out
/// the token for basic credentials (GET) or a refresh token (POST, OAuth2 form).
pub struct TokenProxy {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
    pub token_requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for TokenProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub const PROXY_TOKEN: &str = "tok-123";
pub const PROXY_REFRESH: &str = "refresh-456";

impl TokenProxy {
    pub async fn start(upstream: String, user: &str, pass: &str) -> TokenProxy {
        use base64::Engine as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        );
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count2 = count.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let (basic, upstream, count) = (basic.clone(), upstream.clone(), count2.clone());
                tokio::spawn(async move {
                    let _ = serve_one(conn, port, &basic, &upstream, &count).await;
                });
            }
        });
        TokenProxy {
            port,
            task,
            token_requests: count,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

async fn serve_one(
    mut conn: tokio::net::TcpStream,
    port: u16,
    basic: &str,
    upstream: &str,
    count: &std::sync::atomic::AtomicUsize,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |k: &str| {
        headers
            .iter()
            .find(|(hk, _)| hk == k)
            .map(|(_, v)| v.clone())
    };
    let len: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..]).into_owned();
    let mut parts = request_line.split(' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );

    let (status, mut extra, out): (u16, Vec<(String, String)>, Vec<u8>) = if target
        .starts_with("/token")
    {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let scoped = target.contains("scope=repository%3A") || body.contains("scope=repository%3A");
        let ok = match method {
            "GET" => header("authorization").as_deref() == Some(basic) && scoped,
            "POST" => {
                body.contains(&format!("refresh_token={PROXY_REFRESH}"))
                    && body.contains("grant_type=refresh_token")
                    && scoped
            }
            _ => false,
        };
        if ok {
            let key = if method == "GET" {
                "token"
            } else {
                "access_token"
            };
            (
                200,
                vec![("Content-Type".into(), "application/json".into())],
                format!("{{\"{key}\":\"{PROXY_TOKEN}\"}}").into_bytes(),
            )
        } else {
            (401, vec![], b"{}".to_vec())
        }
    } else if header("authorization").as_deref() == Some(&format!("Bearer {PROXY_TOKEN}")) {
        let mut req = reqwest::Client::new().get(format!("{upstream}{target}"));
        if let Some(a) = header("accept") {
            req = req.header("accept", a);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let mut hs = Vec::new();
        for k in ["content-type", "docker-content-digest"] {
            if let Some(v) = resp.headers().get(k) {
                hs.push((k.to_string(), v.to_str().unwrap().to_string()));
            }
        }
        (status, hs, resp.bytes().await.unwrap().to_vec())
    } else {
        let repo = target
            .trim_start_matches("/v2/")
            .split("/manifests/")
            .next()
            .unwrap_or("")
            .split("/blobs/")
            .next()
            .unwrap_or("");
        (
            401,
            vec![(
                "WWW-Authenticate".into(),
                format!("Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"test-service\",scope=\"repository:{repo}:pull\""),
            )],
            b"{}".to_vec(),
        )
    };
    extra.push(("Content-Length".into(), out.len().to_string()));
    extra.push(("Connection".into(), "close".into()));
    let mut resp = format!("HTTP/1.1 {status} X\r\n");
    for (k, v) in extra {
        resp.push_str(&format!("{k}: {v}\r\n"));
    }
    resp.push_str("\r\n");
    conn.write_all(resp.as_bytes()).await?;
    conn.write_all(&out).await?;
    conn.shutdown().await
}

/// A front for a registry that passes every request through, except GETs of
/// one blob: those get its headers and first half, then nothing (connection
/// held open) — a registry stalling mid-download. `stalled` is notified then.
pub struct StallProxy {
    pub port: u16,
    pub stalled: std::sync::Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StallProxy {
    pub async fn start(upstream: String, stall: Digest) -> StallProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stalled = std::sync::Arc::new(tokio::sync::Notify::new());
        let notify = stalled.clone();
        let task = tokio::spawn(async move {
            // Dropped with the task: every held connection goes too.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((conn, _)) = listener.accept().await {
                let (upstream, stall, notify) = (upstream.clone(), stall.clone(), notify.clone());
                conns.spawn(async move {
                    let _ = stall_one(conn, &upstream, &stall, &notify).await;
                });
            }
        });
        StallProxy {
            port,
            stalled,
            task,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

async fn stall_one(
    mut conn: tokio::net::TcpStream,
    upstream: &str,
    stall: &Digest,
    notify: &tokio::sync::Notify,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let target = head.split(' ').nth(1).unwrap_or("/").to_string();
    let accept = head
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("accept"))
        .map(|(_, v)| v.trim().to_string());
    let mut req = reqwest::Client::new().get(format!("{upstream}{target}"));
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    let body = resp.bytes().await.unwrap().to_vec();
    let mut out = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(t) = ctype {
        out.push_str(&format!("Content-Type: {t}\r\n"));
    }
    out.push_str("\r\n");
    conn.write_all(out.as_bytes()).await?;
    if target.ends_with(&format!("/blobs/{stall}")) {
        conn.write_all(&body[..body.len() / 2]).await?;
        conn.flush().await?;
        notify.notify_one();
        std::future::pending::<()>().await;
    }
    conn.write_all(&body).await?;
    conn.shutdown().await
}

/// Whether this host can run the image store's tests: root plus the tools
/// they drive. Prints the reason and returns false when it cannot (CI has all).
pub fn host_ready() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    if !root {
        eprintln!("SKIP: the image store tests need root (mounts, device nodes, chown)");
        return false;
    }
    let tools = [
        "/usr/bin/docker-registry",
        "/bin/busybox",
        "/usr/sbin/mkfs.ext4",
        "/usr/bin/qemu-img",
        "/usr/bin/skopeo",
        "/usr/bin/umoci",
    ];
    for t in tools {
        if !Path::new(t).exists() {
            eprintln!("SKIP: {t} is missing (hack/install-deps installs it)");
            return false;
        }
    }
    true
}
