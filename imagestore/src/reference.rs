//! Image references, normalised the way kubelet and docker do:
//! `busybox` → `docker.io/library/busybox:latest`, `foo/bar@sha256:..`,
//! `localhost:5000/x` → `localhost:5000/x:latest`.

use std::fmt;

use crate::digest::Digest;
use crate::error::{ImageError, Result};

pub const DEFAULT_REGISTRY: &str = "docker.io";
pub const DEFAULT_TAG: &str = "latest";

/// A fully qualified reference: registry, repository and a tag and/or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `docker.io`, `localhost:5000`, `registry.k8s.io`.
    pub registry: String,
    /// `library/busybox`.
    pub repository: String,
    /// `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl Reference {
    /// Parses and normalises a reference as kubelet does.
    pub fn parse(input: &str) -> Result<Self> {
        let bad = |reason: &str| ImageError::InvalidReference {
            reference: input.to_string(),
            reason: reason.to_string(),
        };
        if input.is_empty() || input.len() > 4096 {
            return Err(bad("empty or too long"));
        }
        let (name, digest) = match input.split_once('@') {
            Some((n, d)) => (n, Some(Digest::parse(d).map_err(|_| bad("bad digest"))?)),
            None => (input, None),
        };
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_slash..].rfind(':') {
            Some(i) => {
                let (n, t) = name.split_at(last_slash + i);
                (n, Some(t[1..].to_string()))
            }
            None => (name, None),
        };
        if let Some(t) = &tag {
            let valid = !t.is_empty()
                && t.len() <= 128
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
                && !t.starts_with(['.', '-']);
            if !valid {
                return Err(bad("bad tag"));
            }
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" || registry == "registry-1.docker.io" {
            DEFAULT_REGISTRY.to_string()
        } else {
            registry
        };
        if registry.chars().any(|c| c.is_ascii_uppercase()) || registry.is_empty() {
            return Err(bad("bad registry host"));
        }
        if path.is_empty()
            || path.split('/').any(|c| {
                c.is_empty()
                    || !c.chars().all(|ch| {
                        ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(ch)
                    })
                    || !c.starts_with(|ch: char| ch.is_ascii_alphanumeric())
                    || !c.ends_with(|ch: char| ch.is_ascii_alphanumeric())
            })
        {
            return Err(bad("repository must be lowercase [a-z0-9._-] components"));
        }
        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let tag = match (&tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            _ => tag,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// `docker.io/library/busybox`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// What the registry API is asked for: the digest if any, else the tag.
    pub fn api_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }

    /// `docker.io/library/busybox:latest`, if a tag was given.
    pub fn tagged(&self) -> Option<String> {
        self.tag.as_ref().map(|t| format!("{}:{t}", self.name()))
    }

    /// `docker.io/library/busybox@sha256:...` for a given manifest digest.
    pub fn with_digest(&self, digest: &Digest) -> String {
        format!("{}@{digest}", self.name())
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn short_names_normalise_like_kubelet() {
        let cases = [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("foo/bar", "docker.io/foo/bar:latest"),
            ("index.docker.io/foo/bar:v1", "docker.io/foo/bar:v1"),
            ("localhost:5000/x", "localhost:5000/x:latest"),
            ("localhost/x:1", "localhost/x:1"),
            ("registry.k8s.io/pause:3.9", "registry.k8s.io/pause:3.9"),
            ("127.0.0.1:5000/a/b/c:t", "127.0.0.1:5000/a/b/c:t"),
        ];
        for (input, want) in cases {
            let r = Reference::parse(input).unwrap();
            assert_eq!(r.to_string(), want, "{input}");
        }
    }

    #[test]
    fn digests_keep_no_default_tag() {
        let r = Reference::parse(&format!("foo/bar@{D}")).unwrap();
        assert_eq!(r.to_string(), format!("docker.io/foo/bar@{D}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.api_reference(), D);
        let r = Reference::parse(&format!("localhost:5000/x:1@{D}")).unwrap();
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert_eq!(r.api_reference(), D);
    }

    #[test]
    fn bad_references_are_invalid_argument() {
        for input in [
            "",
            "Busybox",
            "foo//bar",
            "foo:",
            "foo@sha256:12",
            "foo:-x",
            "/x",
            "a/b/",
        ] {
            let e = Reference::parse(input).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument, "{input}");
        }
    }
}
