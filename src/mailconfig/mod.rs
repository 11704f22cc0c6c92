//! Mail configuration shared by the operator's builders and the in-pod agent.
//!
//! The operator renders a MailPod into two ConfigMaps: the access tables ([`tables`]) and the mail
//! settings ([`settings`]). The agent reads both back with the same types and renders Postfix
//! ([`postfix`]) and Dovecot ([`dovecot`]) configuration from them for its role, with the paths and ports of
//! [`layout`], so what the operator writes and what the pods apply cannot drift.

pub mod dovecot;
pub mod layout;
pub mod postfix;
pub mod rspamd;
pub mod settings;
pub mod tables;
