//! One error type for the controllers, one variant per pipeline step, each keeping its cause.

use crate::crd::ValidationErrors;

/// What can stop a reconcile. Invalid specs are not errors: they become a condition and wait for a change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Fetching a referenced ConfigMap/Secret or listing children failed.
    #[error("reading {what}: {source}")]
    Read {
        what: String,
        #[source]
        source: kube::Error,
    },
    /// Server-Side Apply of a child failed.
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    /// Deleting an orphaned child failed.
    #[error("deleting {kind} {name}: {source}")]
    Delete {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    /// Writing the resource's status failed.
    #[error("writing status: {source}")]
    Status {
        #[source]
        source: kube::Error,
    },
    /// The failover decision could not be recorded: the LUN kept changing under the compare-and-swap.
    #[error("StorageLUN {0} changed under every attempt to record the failover decision")]
    DecisionConflict(String),
    /// A stored object does not have the shape of its kind.
    #[error("reading {what}: {source}")]
    Decode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// The object has no namespace (the custom resources are namespaced; only a broken client sends this).
    #[error("{0} has no namespace")]
    MissingNamespace(String),
    /// The operating system gave no random bytes (for a generated password).
    #[error("no random bytes from the operating system: {0}")]
    Random(String),
    /// The spec cannot be applied; reported in status, never retried until the spec changes.
    #[error("invalid spec: {0}")]
    InvalidSpec(ValidationErrors),
}

impl Error {
    /// Short, bounded label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Read { .. } => "read",
            Error::Apply { .. } => "apply",
            Error::Delete { .. } => "delete",
            Error::Status { .. } => "status",
            Error::DecisionConflict(_) => "decision_conflict",
            Error::Decode { .. } => "decode",
            Error::MissingNamespace(_) => "missing_namespace",
            Error::Random(_) => "random",
            Error::InvalidSpec(_) => "invalid_spec",
        }
    }

    /// The API's HTTP code, for errors that came from the API server.
    pub fn api_code(&self) -> Option<u16> {
        match self {
            Error::Read { source, .. }
            | Error::Apply { source, .. }
            | Error::Delete { source, .. }
            | Error::Status { source } => match source {
                kube::Error::Api(s) => Some(s.code),
                _ => None,
            },
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
