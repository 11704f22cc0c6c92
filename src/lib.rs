//! mailpod-operator: a Kubernetes operator for highly-available mail service.
//!
//! Layout: [`agent`] (the in-pod supervisor of Postfix/Dovecot), [`crd`] (the custom resources), [`placement`] (mailboxes onto LUNs), [`mailconfig`] (tables and
//! settings shared by operator and agent), [`resources`] (pure builders: resource -> Kubernetes objects),
//! [`render`] (what `mailpod-operator render` prints), [`names`] (object names and labels).
#![forbid(unsafe_code)]

pub mod agent;
pub mod agent_client;
pub mod backup;
pub mod controller;
pub mod crd;
pub mod mailconfig;
pub mod metrics;
pub mod names;
pub mod operator;
pub mod placement;
pub mod plugin;
pub mod render;
pub mod resources;
pub mod restore;
pub mod snapshot;
pub mod telemetry;

#[cfg(feature = "testkit")]
pub mod testkit;
