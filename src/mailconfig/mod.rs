//! Mail configuration shared by the operator's builders and the in-pod agent.
//!
//! The operator renders a MailPod into two ConfigMaps: the access tables ([`tables`]) and the mail
//! settings ([`settings`]). The agent reads both back with the same types and renders Postfix and
//! Dovecot configuration from them, so what the operator writes and what the pods apply cannot drift.

pub mod settings;
pub mod tables;
