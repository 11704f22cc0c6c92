//! Where a mail pod keeps its files and on which ports it answers.
//!
//! In a cluster the defaults are the standard ports and `/var` paths of the mail image (see
//! mail-image/Dockerfile, which creates them). Tests put everything under one temporary directory and on
//! 127.0.0.1 high ports with [`Layout::under`] and [`Ports`] values of their own.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The roles of a mail pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Inbound SMTP (port 25): postscreen, access tables, transport to the mailbox's LUN over LMTP.
    Mx,
    /// Authenticated submission (587) for the users' clients.
    Submission,
    /// IMAP proxy routing each user to their LUN's store.
    Imap,
    /// POP3 proxy routing each user to their LUN's store.
    Pop3,
    /// A LUN's back-end store: LMTP, IMAP, POP3 on Maildir.
    Store,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Mx,
        Role::Submission,
        Role::Imap,
        Role::Pop3,
        Role::Store,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Mx => "mx",
            Role::Submission => "submission",
            Role::Imap => "imap",
            Role::Pop3 => "pop3",
            Role::Store => "store",
        }
    }

    /// Whether the role runs Postfix.
    pub fn runs_postfix(self) -> bool {
        matches!(self, Role::Mx | Role::Submission)
    }

    /// Whether the role runs Dovecot (submission runs it for SASL authentication only).
    pub fn runs_dovecot(self) -> bool {
        !matches!(self, Role::Mx)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!("unknown role `{s}` (expected mx, submission, imap, pop3 or store)")
            })
    }
}

/// Listening address and ports of a mail pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ports {
    /// Address the services bind to (`0.0.0.0` in a cluster, `127.0.0.1` in tests).
    pub listen: String,
    pub smtp: u16,
    pub submission: u16,
    /// Implicit TLS (RFC 8314): submissions, imaps, pop3s. Served only with a certificate.
    pub submissions: u16,
    pub imap: u16,
    pub imaps: u16,
    pub pop3: u16,
    pub pop3s: u16,
    /// Store role: the LMTP port Postfix delivers to (answered by the agent's pause gate).
    pub lmtp: u16,
    /// Store role: Dovecot's doveadm TCP service, which the LUN's standbys replicate from.
    pub doveadm: u16,
    /// Store role: doveadm's TLS listener for the other site's standbys (only with a site certificate).
    pub doveadm_tls: u16,
    /// Store and imap roles: ManageSieve (the imap proxies forward it to the user's store).
    pub sieve: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0".into(),
            smtp: 25,
            submission: 587,
            submissions: 465,
            imap: 143,
            imaps: 993,
            pop3: 110,
            pop3s: 995,
            lmtp: 24,
            doveadm: 12345,
            doveadm_tls: 12346,
            sieve: 4190,
        }
    }
}

/// The home of `address` (`user@domain`) under a store's `mail_root`, in its `incarnation` on the LUN:
/// `<domain>/<user>` for the first (0), `.incarnation-<n>/<domain>/<user>` for an address the LUN took
/// back after a removal, so it never opens the Maildir, sieve scripts or vacation state its previous owner
/// left. A dot directory: nothing that looks for `<domain>/<user>/Maildir` mistakes it for a domain, and
/// no domain starts with a dot. `None` when `address` is not `user@domain`.
pub fn home(mail_root: &Path, address: &str, incarnation: u32) -> Option<PathBuf> {
    let (user, domain) = address.split_once('@')?;
    if user.is_empty()
        || domain.is_empty()
        || address.contains('/')
        || user.starts_with('.')
        || domain.starts_with('.')
    {
        return None;
    }
    let base = match incarnation {
        0 => mail_root.to_path_buf(),
        n => mail_root.join(format!(".incarnation-{n}")),
    };
    Some(base.join(domain).join(user))
}

/// Files and directories of a mail pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Postfix `config_directory`: main.cf, master.cf and `maps/`.
    pub postfix_config: PathBuf,
    /// Postfix `queue_directory` (the mx queue lives on a PVC here).
    pub postfix_queue: PathBuf,
    /// Postfix `data_directory` (owned by the postfix user).
    pub postfix_data: PathBuf,
    /// Dovecot configuration file and the passwd-files rendered for it.
    pub dovecot_config: PathBuf,
    /// Dovecot `base_dir` (sockets, pid).
    pub dovecot_base: PathBuf,
    /// Dovecot `state_dir`.
    pub dovecot_state: PathBuf,
    /// Store role: Maildirs, one per mailbox, under `<domain>/<user>/Maildir`.
    pub mail_root: PathBuf,
    /// Postfix `maillog_file` and Dovecot `log_path` live here; the agent tails them.
    pub log_dir: PathBuf,
    /// `tls.crt` and `tls.key` (a kubernetes.io/tls Secret) when settings say TLS is on.
    pub tls_dir: PathBuf,
    /// Users and password hashes in Dovecot passwd-file format (`address:{SCHEME}hash`), from a Secret.
    pub users_file: PathBuf,
    /// Store role: the password the LUN's replicas share for doveadm over TCP, from a Secret that may
    /// appear after the pod starts.
    pub doveadm_password_file: PathBuf,
    /// Store role: `tls.crt`, `tls.key` and `ca.crt` of `spec.backend.siteReplication.tls` (a
    /// kubernetes.io/tls Secret): the certificate doveadm's TLS listener presents to the other site, and
    /// the CA a standby verifies the other site's with. `None` when the MailPod has no site replication.
    pub site_tls_dir: Option<PathBuf>,
    /// Numeric owner of the Maildirs (the image's `vmail` user).
    pub mail_uid: u32,
    pub mail_gid: u32,
}

impl Default for Layout {
    fn default() -> Self {
        Self {
            postfix_config: "/var/lib/mailpod/postfix".into(),
            postfix_queue: "/var/spool/postfix".into(),
            postfix_data: "/var/lib/postfix".into(),
            dovecot_config: "/var/lib/mailpod/dovecot".into(),
            dovecot_base: "/run/dovecot".into(),
            dovecot_state: "/var/lib/dovecot".into(),
            mail_root: "/var/mail/store".into(),
            log_dir: "/var/log/mailpod".into(),
            tls_dir: "/etc/mailpod/tls".into(),
            users_file: "/etc/mailpod/users/users".into(),
            doveadm_password_file: "/etc/mailpod/replication/doveadm-password".into(),
            site_tls_dir: None,
            mail_uid: 5000,
            mail_gid: 5000,
        }
    }
}

impl Layout {
    /// Everything under `root` (the agent's `--work-dir` for generated files; tests use a temp dir).
    pub fn under(root: &Path) -> Self {
        Self {
            postfix_config: root.join("postfix"),
            postfix_queue: root.join("spool"),
            postfix_data: root.join("postfix-data"),
            dovecot_config: root.join("dovecot"),
            dovecot_base: root.join("dovecot-run"),
            dovecot_state: root.join("dovecot-state"),
            mail_root: root.join("mail"),
            log_dir: root.join("log"),
            tls_dir: root.join("tls"),
            users_file: root.join("users"),
            doveadm_password_file: root.join("doveadm-password"),
            ..Self::default()
        }
    }

    pub fn postfix_maps(&self) -> PathBuf {
        self.postfix_config.join("maps")
    }

    pub fn postfix_log(&self) -> PathBuf {
        self.log_dir.join("postfix.log")
    }

    pub fn dovecot_log(&self) -> PathBuf {
        self.log_dir.join("dovecot.log")
    }

    pub fn dovecot_conf(&self) -> PathBuf {
        self.dovecot_config.join("dovecot.conf")
    }

    /// Store role: `doveadm_password` for the doveadm TCP service, rendered from the replication Secret
    /// (mode 0600) and included by dovecot.conf when present.
    pub fn doveadm_conf(&self) -> PathBuf {
        self.dovecot_config.join("doveadm.conf")
    }

    /// Store role: the cross-site TLS listener and its certificate, included by dovecot.conf; empty until
    /// the site certificate is mounted (see mailconfig::dovecot::site_tls_conf).
    pub fn site_tls_conf(&self) -> PathBuf {
        self.dovecot_config.join("site-tls.conf")
    }

    /// Store role: the CA a standby verifies the other site's doveadm certificate with.
    pub fn site_ca_file(&self) -> Option<PathBuf> {
        self.site_tls_dir.as_ref().map(|d| d.join("ca.crt"))
    }

    /// Store role: where the agent records this replica's last role, on the mail volume so it outlives
    /// restarts (a demoted active must merge before it mirrors; see agent::replication).
    pub fn replica_role_file(&self) -> PathBuf {
        self.mail_root.join(".mailpod-replica-role")
    }

    /// Store and submission: the agent's private copy of [`Layout::users_file`] that Dovecot's auth process
    /// reads (owned by Dovecot's internal user, mode 0400; see agent::passwd).
    pub fn private_users_file(&self) -> PathBuf {
        self.dovecot_config.join("users.passwd")
    }

    /// Store role: present while this replica is not its LUN's active; its users file is then empty, so
    /// every login is refused (see agent::role).
    pub fn logins_refused_marker(&self) -> PathBuf {
        self.dovecot_config.join("logins-refused")
    }

    /// Unix socket of Dovecot's LMTP service; on the store the agent's pause gate forwards to it.
    pub fn lmtp_socket(&self) -> PathBuf {
        self.dovecot_base.join("lmtp")
    }

    /// Unix socket Postfix's smtpd uses for SASL through Dovecot's auth (submission role).
    pub fn sasl_socket(&self) -> PathBuf {
        self.dovecot_base.join("auth-postfix")
    }
}
