//! The `metav1.Status` written on the error stream when an exec or attach ends.

use serde::Serialize;

#[derive(Debug, Serialize)]
struct Status<'a> {
    metadata: Metadata,
    status: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<Details<'a>>,
}

#[derive(Debug, Serialize)]
struct Metadata {}

#[derive(Debug, Serialize)]
struct Details<'a> {
    causes: Vec<Cause<'a>>,
}

#[derive(Debug, Serialize)]
struct Cause<'a> {
    reason: &'a str,
    message: String,
}

/// How an exec or attach ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    ExitCode { cmd: Vec<String>, code: i32 },
    Error(String),
}

impl Outcome {
    fn message(&self) -> Option<String> {
        match self {
            Outcome::Success => None,
            // Worded like kubelet's (Go's %v of the command).
            Outcome::ExitCode { cmd, code } => Some(format!(
                "command terminated with non-zero exit code: error executing command [{}], exit code {code}",
                cmd.join(" ")
            )),
            Outcome::Error(m) => Some(m.clone()),
        }
    }

    /// The v4+ form: a JSON `metav1.Status`, also on success.
    pub(crate) fn v4_json(&self) -> Vec<u8> {
        let code;
        let status = match self {
            Outcome::Success => Status {
                metadata: Metadata {},
                status: "Success",
                message: None,
                reason: None,
                details: None,
            },
            Outcome::ExitCode { code: c, .. } => {
                code = c.to_string();
                Status {
                    metadata: Metadata {},
                    status: "Failure",
                    message: self.message(),
                    reason: Some("NonZeroExitCode"),
                    details: Some(Details {
                        causes: vec![Cause {
                            reason: "ExitCode",
                            message: code,
                        }],
                    }),
                }
            }
            Outcome::Error(_) => Status {
                metadata: Metadata {},
                status: "Failure",
                message: self.message(),
                reason: Some("InternalError"),
                details: None,
            },
        };
        // Serializing this plain struct cannot fail; an empty status is the fallback anyway.
        serde_json::to_vec(&status).unwrap_or_default()
    }

    /// The pre-v4 form: the error text, nothing on success.
    pub(crate) fn plain(&self) -> Vec<u8> {
        self.message().map(String::into_bytes).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_what_kubectl_parses() {
        assert_eq!(
            String::from_utf8(Outcome::Success.v4_json()).unwrap(),
            r#"{"metadata":{},"status":"Success"}"#
        );
        let v: serde_json::Value = serde_json::from_slice(
            &Outcome::ExitCode {
                cmd: vec!["sh".into(), "-c".into(), "exit 3".into()],
                code: 3,
            }
            .v4_json(),
        )
        .unwrap();
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["reason"], "NonZeroExitCode");
        assert_eq!(v["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(v["details"]["causes"][0]["message"], "3");
        assert!(v["message"]
            .as_str()
            .unwrap()
            .starts_with("command terminated with non-zero exit code"));
        assert!(Outcome::Success.plain().is_empty());
        assert_eq!(Outcome::Error("boom".into()).plain(), b"boom");
    }
}
