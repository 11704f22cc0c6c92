//! The custom resources: `MailPod`, `StorageLUN` and `SiteFailover` (group `mailpod.io`, version `v1alpha1`).
//!
//! Each kind has its spec and status types, defaults, and a `validate()` that applies in Rust the same rules
//! the CRD schema states for the API server (ranges, enums, CEL), so `render`, the reconcilers and the
//! API server accept the same things. Errors name the field path.

mod common;
mod dkim;
mod failover;
mod filtering;
mod lun;
mod mailpod;
mod store_features;
mod validation;

pub use common::*;
pub use dkim::*;
pub use failover::*;
pub use filtering::*;
pub use lun::*;
pub use mailpod::*;
pub use store_features::*;
pub use validation::{
    parse_bytes as validation_bytes, split_address, FieldError, ValidationErrors,
};

use kube::CustomResourceExt;

/// API group of every custom resource of this operator.
pub const GROUP: &str = "mailpod.io";
/// API version served and stored.
pub const VERSION: &str = "v1alpha1";

/// The three CustomResourceDefinitions, in the order they are printed and installed.
pub fn all_crds(
) -> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![MailPod::crd(), StorageLUN::crd(), SiteFailover::crd()]
}

/// All CRDs as multi-document YAML, exactly as crds/ holds them (one document each, in `all_crds` order).
pub fn crds_yaml() -> String {
    all_crds()
        .iter()
        .map(|crd| {
            format!(
                "---\n{}",
                serde_yaml::to_string(crd).expect("CRD serializes")
            )
        })
        .collect()
}
