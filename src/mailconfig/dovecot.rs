//! Dovecot configuration: the `store` (LMTP, IMAP, POP3 on Maildir), the `imap`/`pop3` proxies that route
//! each user to their LUN's store, and the auth-only instance behind `submission`'s SASL.
//!
//! Passwords: stores and submission read the users Secret (Dovecot passwd-file lines
//! `address:{SCHEME}hash`, e.g. from `doveadm pw -s SHA512-CRYPT`). The proxies hold no passwords: their
//! passdb says `proxy=y host=... nopassword=y`, so the store behind verifies the password the client gave.

use std::fmt::Write as _;
use std::path::Path;

use super::layout::{Layout, Ports, Role};
use super::settings::{MailSettings, QuotaSettings, SieveSettings};
use super::tables::AccessTables;

/// The user Dovecot's internal services run as (`default_internal_user`), among them auth, which opens
/// the passwd-file.
pub const DOVECOT_INTERNAL_USER: &str = "dovecot";

/// The services Dovecot 2.3 chroots by default (`doveconf -d`), Pigeonhole's `managesieve-login`
/// (Debian's dovecot-managesieved) included. A chroot needs CAP_SYS_CHROOT, which mail pods drop, and
/// `anvil` or a login process that cannot chroot exits with `Operation not permitted`: each is rendered
/// with `chroot =`. The pod is the sandbox, as for Postfix (master.cf renders no chroot). A block for a
/// service whose package is not installed is harmless (Dovecot starts nothing for it).
pub const DEFAULT_CHROOTED_SERVICES: [&str; 10] = [
    "aggregator",
    "anvil",
    "director",
    "imap-login",
    "imap-urlauth-login",
    "ipc",
    "managesieve-login",
    "old-stats",
    "pop3-login",
    "submission-login",
];

/// File name (under [`Layout::dovecot_config`]) of the store's iterable userdb: every mailbox of the tables.
pub const STORE_USERDB: &str = "userdb";

/// The store's userdb file: one passwd-file line per mailbox (uid, gid and home come from the userdb's
/// `default_fields`); a mailbox with a quota override carries it as userdb fields, which replace the
/// default rules of the same name (`quota_rule` storage, `quota_rule2` messages).
pub fn store_userdb(tables: &AccessTables, mail_root: &std::path::Path) -> String {
    let mut out = String::new();
    for mailbox in tables.mailboxes.keys() {
        // A mailbox its LUN took back after a removal has a home of its own; the others take the
        // default_fields' home (`<mail root>/%d/%n`).
        let home = tables
            .incarnations
            .get(mailbox)
            .and_then(|n| super::layout::home(mail_root, mailbox, *n))
            .map(|h| h.display().to_string())
            .unwrap_or_default();
        // Every field present: passwd-file reads a shorter line as a user it cannot find, and
        // `doveadm -A` (quota get) then skips the mailbox as one that "no longer exists".
        let mut fields = Vec::new();
        if let Some(q) = tables.quotas.get(mailbox) {
            if let Some(b) = q.storage_bytes {
                fields.push(format!("userdb_quota_rule=*:storage={b}B"));
            }
            if let Some(n) = q.messages {
                fields.push(format!("userdb_quota_rule2=*:messages={n}"));
            }
        }
        let _ = writeln!(out, "{mailbox}:::::{home}::{}", fields.join(" "));
    }
    out
}

/// The quota plugin on a store. The `count` backend: usage comes from the mailbox indexes Dovecot keeps
/// anyway, so there is no `maildirsize` file to drift (the `maildir` backend's, which dsync does not
/// replicate and which goes stale when files are added or removed behind Dovecot's back, as a restore
/// does) and nothing to recalculate after a failover. `quota_vsizes` makes sizes the virtual (CRLF) sizes
/// that count expects. Over quota at RCPT (`lmtp_rcpt_check_quota`) or DATA, LMTP answers 452 4.2.2 with
/// `quota_full_tempfail`, 552 5.2.2 without; IMAP APPEND gets `NO [OVERQUOTA]`.
fn quota_conf(out: &mut String, quota: &QuotaSettings) {
    out.push_str("mail_plugins = $mail_plugins quota\n");
    let _ = writeln!(
        out,
        "quota_full_tempfail = {}",
        if quota.tempfail { "yes" } else { "no" }
    );
    out.push_str("lmtp_rcpt_check_quota = yes\n");
    out.push_str("protocol imap {\n  mail_plugins = $mail_plugins imap_quota\n}\n");
    let _ = write!(
        out,
        "plugin {{\n  quota = count:User quota\n  quota_vsizes = yes\n  quota_rule = *:storage={}B\n",
        quota.storage_bytes
    );
    if let Some(n) = quota.messages {
        let _ = writeln!(out, "  quota_rule2 = *:messages={n}");
    }
    out.push_str("}\n");
}

/// File names (under [`Layout::dovecot_config`]) of the proxy passdbs the imap/pop3 roles render from the
/// tables: one per protocol (`proxy-passdb-imap`, `-sieve`, `-pop3`), since each names the store's port for
/// its protocol; dovecot.conf picks the file with the service name (`%s`).
pub const PROXY_PASSDB_PREFIX: &str = "proxy-passdb-";

/// The protocols a proxy role forwards: the imap proxies forward ManageSieve too.
pub fn proxy_protocols(role: Role) -> &'static [&'static str] {
    match role {
        Role::Imap => &["imap", "sieve"],
        Role::Pop3 => &["pop3"],
        _ => &[],
    }
}

/// The proxy passdb for `protocol` (`imap`, `sieve` or `pop3`): one passwd-file line per mailbox whose LUN
/// has an endpoint. Dovecot re-reads a passwd-file when its modification time changes, so an update needs
/// no reload.
pub fn proxy_passdb(protocol: &str, tables: &AccessTables) -> String {
    let mut out = String::new();
    for (mailbox, lun) in &tables.mailboxes {
        let Some(e) = tables.luns.get(lun) else {
            continue;
        };
        let port = match protocol {
            "pop3" => e.pop3_port,
            "sieve" => e.sieve_port,
            _ => e.imap_port,
        };
        let _ = writeln!(
            out,
            "{mailbox}:::::::proxy=y host={} port={port} nopassword=y",
            e.host
        );
    }
    out
}

/// dovecot.conf for `role`; `users` is the passwd-file with the users' password hashes (store, submission).
pub fn dovecot_conf(
    role: Role,
    settings: &MailSettings,
    layout: &Layout,
    ports: &Ports,
    users: &Path,
) -> String {
    let listen = if ports.listen == "0.0.0.0" {
        "*, ::".to_string()
    } else {
        ports.listen.clone()
    };
    let protocols = match role {
        Role::Store => "imap pop3 lmtp sieve",
        Role::Imap => "imap sieve",
        Role::Pop3 => "pop3",
        Role::Submission | Role::Mx => "none",
    };
    let mut out = format!(
        "# Rendered by mailpod-operator agent for role {role} of MailPod {}; edits are overwritten.\n",
        settings.mailpod
    );
    let mut set = |k: &str, v: &str| {
        let _ = writeln!(out, "{k} = {v}");
    };
    set("base_dir", &layout.dovecot_base.display().to_string());
    set("state_dir", &layout.dovecot_state.display().to_string());
    set("log_path", &layout.dovecot_log().display().to_string());
    set("protocols", protocols);
    set("listen", &listen);
    set("hostname", &settings.hostname);
    set("default_internal_user", DOVECOT_INTERNAL_USER);
    set("default_login_user", "dovenull");
    set("auth_mechanisms", "plain login");
    // Front ends terminate TLS; stores sit behind the NetworkPolicy and take the proxies' plaintext logins.
    let tls_front = settings.tls && matches!(role, Role::Imap | Role::Pop3);
    if tls_front {
        set("ssl", "required");
        set(
            "ssl_cert",
            &format!("<{}", layout.tls_dir.join("tls.crt").display()),
        );
        set(
            "ssl_key",
            &format!("<{}", layout.tls_dir.join("tls.key").display()),
        );
        set("disable_plaintext_auth", "yes");
    } else {
        set("ssl", "no");
        set("disable_plaintext_auth", "no");
    }
    let uid = layout.mail_uid.to_string();
    let gid = layout.mail_gid.to_string();
    set("mail_uid", &uid);
    set("mail_gid", &gid);
    set("first_valid_uid", &uid);
    set("first_valid_gid", &gid);
    let passdb = match role {
        Role::Imap | Role::Pop3 => layout
            .dovecot_config
            .join(format!("{PROXY_PASSDB_PREFIX}%s")),
        _ => users.to_path_buf(),
    };
    let _ = writeln!(
        out,
        "passdb {{\n  driver = passwd-file\n  args = {}\n}}",
        passdb.display()
    );
    let home = layout.mail_root.join("%d").join("%n");
    if role == Role::Store {
        // The mailboxes of the tables, so that doveadm can list users (`-F`/`-A` iterate the userdb; the
        // static one cannot, and doveadm then logs errors and at times aborts).
        let _ = writeln!(
            out,
            "userdb {{\n  driver = passwd-file\n  args = {}\n  default_fields = uid={uid} gid={gid} home={}\n}}",
            layout.dovecot_config.join(STORE_USERDB).display(),
            home.display()
        );
    }
    // The operator's mailbox table decides who exists: on a store only the userdb above (a mailbox of
    // the tables without a password entry still receives mail, it just cannot log in yet). No static
    // fallback there: an address missing from it is one whose tables this store has not read yet, and
    // a default home would be the one the address had before its LUN took it back. Dovecot answers it
    // `550 5.1.1`, which the LMTP gate makes a `450` (agent::lmtp_gate), so the mail waits in the mx queue.
    if role != Role::Store {
        let _ = writeln!(
            out,
            "userdb {{\n  driver = static\n  args = uid={uid} gid={gid} home={} allow_all_users=yes\n}}",
            home.display()
        );
    }
    match role {
        Role::Store => {
            out.push_str("mail_location = maildir:~/Maildir\n");
            // POP3 UIDLs are the messages' GUIDs, which dsync carries to every replica, and are saved in
            // dovecot-uidlist: a hand-over that renumbers UIDs does not make leave-on-server clients
            // download the mailbox again.
            out.push_str("pop3_uidl_format = %g\npop3_save_uidl = yes\n");
            if let Some(q) = &settings.features.quota {
                quota_conf(&mut out, q);
            }
            let _ = writeln!(
                out,
                "protocol lmtp {{\n  postmaster_address = postmaster@{}\n  mail_plugins = $mail_plugins sieve\n}}",
                settings.hostname
            );
            // LMTP answers on a unix socket only; the agent's pause gate owns the TCP port (see agent::lmtp_gate).
            out.push_str("service lmtp {\n  unix_listener lmtp {\n    mode = 0600\n  }\n}\n");
            login_listener(&mut out, "imap", ports.imap, None);
            login_listener(&mut out, "pop3", ports.pop3, None);
            trusted_proxies(&mut out, &settings.features.trusted_proxy_networks);
            sieve_conf(&mut out, &settings.features.sieve);
            managesieve_listener(&mut out, ports.sieve);
            // The LUN's standbys pull from the active over doveadm's TCP service (dsync). The password
            // lives in its own 0600 file from the replication Secret; until that exists the service
            // refuses every remote command (Dovecot requires doveadm_password for TCP clients).
            // In-site replication stays on this plain listener (the store NetworkPolicy admits only the
            // LUN's replicas and restore jobs); the other site reaches only the TLS listener of
            // site-tls.conf.
            let _ = writeln!(
                out,
                "service doveadm {{\n  inet_listener {{\n    port = {}\n  }}\n}}\n!include_try {}\n!include_try {}",
                ports.doveadm,
                layout.doveadm_conf().display(),
                layout.site_tls_conf().display()
            );
        }
        Role::Imap => {
            login_listener(
                &mut out,
                "imap",
                ports.imap,
                tls_front.then_some(ports.imaps),
            );
            managesieve_listener(&mut out, ports.sieve);
        }
        Role::Pop3 => login_listener(
            &mut out,
            "pop3",
            ports.pop3,
            tls_front.then_some(ports.pop3s),
        ),
        Role::Submission => {
            let _ = writeln!(
                out,
                "service auth {{\n  unix_listener {} {{\n    mode = 0660\n    user = postfix\n    group = postfix\n  }}\n}}",
                layout.sasl_socket().display()
            );
        }
        Role::Mx => {}
    }
    for service in DEFAULT_CHROOTED_SERVICES {
        let _ = writeln!(out, "service {service} {{\n  chroot =\n}}");
    }
    out
}

/// The doveadm.conf a store includes: the replicas' shared `doveadm_password`, quoted for Dovecot's
/// config parser. `None` (no Secret yet) renders an empty file.
pub fn doveadm_password_conf(password: Option<&str>) -> String {
    match password {
        Some(p) => format!(
            "doveadm_password = \"{}\"\n",
            p.replace('\\', "\\\\").replace('"', "\\\"")
        ),
        None => String::new(),
    }
}

/// The store's cross-site doveadm listener over TLS (`site-tls.conf`, included after dovecot.conf's own
/// settings, so it overrides them). Dovecot 2.3 opens no `ssl = yes` listener while the global `ssl` is
/// `no` (silently: no error, nothing listens), so the global setting becomes `yes` with the site
/// certificate, and every mail protocol is kept as it was with `ssl = no` (stores never offer STARTTLS:
/// the proxies speak to them in clear inside the cluster). `digest` (of the certificate, key and CA) is
/// written as a comment, so a renewed certificate changes the file and the agent reloads Dovecot, which
/// reads the certificate only when it (re)loads its configuration. `None` (no certificate mounted yet)
/// renders an empty file: no TLS listener.
pub fn site_tls_conf(dir: Option<&Path>, port: u16, digest: &str) -> String {
    let Some(dir) = dir else {
        return String::new();
    };
    let mut out = format!(
        "# Cross-site replication over TLS; certificate digest {digest}\nssl = yes\nssl_cert = <{}\nssl_key = <{}\n",
        dir.join("tls.crt").display(),
        dir.join("tls.key").display()
    );
    for protocol in ["imap", "pop3", "lmtp", "sieve"] {
        let _ = writeln!(out, "protocol {protocol} {{\n  ssl = no\n}}");
    }
    let _ = writeln!(
        out,
        "service doveadm {{\n  inet_listener doveadm-tls {{\n    port = {port}\n    ssl = yes\n  }}\n}}"
    );
    out
}

/// Sieve on a store (Pigeonhole): LMTP runs each mailbox's active script; scripts live in the mailbox's
/// home on the mail volume (`~/sieve`, the active one linked from `~/.dovecot.sieve`) and are managed over
/// ManageSieve. `fileinto` creates the folder it names. Vacation replies and redirects leave through
/// `submission_host`, the relay of the spec; without one both are off (`-vacation`, no redirects), so a
/// script that uses them fails at upload rather than sending nothing.
fn sieve_conf(out: &mut String, sieve: &SieveSettings) {
    out.push_str("lda_mailbox_autocreate = yes\nlda_mailbox_autosubscribe = yes\n");
    if let Some(relay) = &sieve.relay {
        let _ = writeln!(out, "submission_host = {relay}");
    }
    let _ = write!(
        out,
        "plugin {{\n  sieve = file:~/sieve;active=~/.dovecot.sieve\n  sieve_max_script_size = {}\n  sieve_quota_max_scripts = {}\n",
        sieve.max_script_bytes, sieve.max_scripts
    );
    if sieve.relay.is_none() {
        out.push_str("  sieve_extensions = -vacation\n  sieve_max_redirects = 0\n");
    }
    out.push_str("}\n");
}

fn managesieve_listener(out: &mut String, port: u16) {
    let _ = writeln!(
        out,
        "service managesieve-login {{\n  inet_listener sieve {{\n    port = {port}\n  }}\n}}"
    );
}

/// The login service of `protocol` on `port`, and implicit TLS (`imaps`, `pop3s`) on `tls_port` when the
/// role has a certificate; otherwise nothing listens for implicit TLS.
fn login_listener(out: &mut String, protocol: &str, port: u16, tls_port: Option<u16>) {
    let tls = match tls_port {
        Some(p) => format!("port = {p}\n    ssl = yes"),
        None => "port = 0".into(),
    };
    let _ = writeln!(
        out,
        "service {protocol}-login {{\n  inet_listener {protocol} {{\n    port = {port}\n  }}\n  inet_listener {protocol}s {{\n    {tls}\n  }}\n}}"
    );
}

/// A store trusts the proxies' networks (`login_trusted_networks`): the imap and pop3 proxies then pass the
/// client's address (IMAP `ID x-originating-ip`, POP3 `XCLIENT`), so auth penalties, per-IP connection
/// limits (`mail_max_userip_connections`) and logs see the client, not the proxy pod. Nothing trusted: every
/// limit counts the proxy's address.
fn trusted_proxies(out: &mut String, networks: &[String]) {
    if !networks.is_empty() {
        let _ = writeln!(out, "login_trusted_networks = {}", networks.join(" "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailconfig::tables::LunEndpoint;

    fn settings(tls: bool) -> MailSettings {
        MailSettings {
            mailpod: "corp".into(),
            hostname: "mail.example.com".into(),
            max_message_bytes: 1000,
            connection_rate_limit: 0,
            dnsbl: vec![],
            dnsbl_threshold: 1,
            tls,
            features: Default::default(),
            filter: None,
            signer: None,
        }
    }

    #[test]
    fn proxy_passdb_routes_to_lun_ports() {
        let mut t = AccessTables::default();
        t.mailboxes.insert("a@example.com".into(), 0);
        t.mailboxes.insert("b@example.com".into(), 1);
        t.mailboxes.insert("orphan@example.com".into(), 9);
        t.luns.insert(0, LunEndpoint::in_cluster("corp-lun-0"));
        t.luns.insert(
            1,
            LunEndpoint {
                host: "10.0.0.2".into(),
                lmtp_port: 2024,
                imap_port: 2143,
                pop3_port: 2110,
                sieve_port: 2190,
            },
        );
        assert_eq!(
            proxy_passdb("imap", &t),
            "a@example.com:::::::proxy=y host=corp-lun-0 port=143 nopassword=y\n\
             b@example.com:::::::proxy=y host=10.0.0.2 port=2143 nopassword=y\n"
        );
        assert!(proxy_passdb("pop3", &t).contains("host=10.0.0.2 port=2110 nopassword=y"));
        assert_eq!(
            proxy_passdb("sieve", &t),
            "a@example.com:::::::proxy=y host=corp-lun-0 port=4190 nopassword=y\n\
             b@example.com:::::::proxy=y host=10.0.0.2 port=2190 nopassword=y\n"
        );
        assert_eq!(proxy_protocols(Role::Imap), ["imap", "sieve"]);
        assert_eq!(proxy_protocols(Role::Pop3), ["pop3"]);
    }

    #[test]
    fn store_serves_lmtp_on_socket_and_maildir() {
        let layout = Layout::default();
        let conf = dovecot_conf(
            Role::Store,
            &settings(true),
            &layout,
            &Ports::default(),
            Path::new("/etc/mailpod/users/users"),
        );
        assert!(conf.contains("protocols = imap pop3 lmtp sieve\n"));
        assert!(conf.contains(
            "protocol lmtp {\n  postmaster_address = postmaster@mail.example.com\n  mail_plugins = $mail_plugins sieve\n}\n"
        ));
        assert!(conf.contains("inet_listener sieve {\n    port = 4190\n"));
        // No relay: nothing may try to send.
        assert!(conf.contains("  sieve_extensions = -vacation\n  sieve_max_redirects = 0\n"));
        assert!(!conf.contains("submission_host"));
        assert!(conf.contains("ssl = no\n"), "stores never terminate TLS");
        assert!(conf.contains("args = /etc/mailpod/users/users\n"));
        assert!(conf.contains("default_fields = uid=5000 gid=5000 home=/var/mail/store/%d/%n\n"));
        assert!(
            !conf.contains("allow_all_users"),
            "no default home for an address the tables do not list: {conf}"
        );
        assert!(conf.contains("mail_location = maildir:~/Maildir\n"));
        assert!(conf.contains("unix_listener lmtp {"));
        assert!(conf.contains("inet_listener imap {\n    port = 143\n"));
        assert!(conf.contains("inet_listener pop3 {\n    port = 110\n"));
        assert!(
            conf.contains("inet_listener imaps {\n    port = 0\n"),
            "stores never terminate TLS"
        );
        assert!(!conf.contains("inet_listener lmtp"));
        assert!(
            !conf.contains("login_trusted_networks"),
            "nobody trusted unless the settings name the proxies"
        );
        let mut s = settings(true);
        s.features.trusted_proxy_networks = vec!["10.0.0.0/8".into(), "fc00::/7".into()];
        let trusting = dovecot_conf(Role::Store, &s, &layout, &Ports::default(), Path::new("/u"));
        assert!(trusting.contains("\nlogin_trusted_networks = 10.0.0.0/8 fc00::/7\n"));
        let proxy = dovecot_conf(Role::Imap, &s, &layout, &Ports::default(), Path::new("/u"));
        assert!(
            !proxy.contains("login_trusted_networks"),
            "the proxies trust no client"
        );
        // The pod drops SYS_CHROOT: nothing may chroot.
        for service in ["anvil", "imap-login", "pop3-login", "ipc"] {
            assert!(
                conf.contains(&format!("service {service} {{\n  chroot =\n}}\n")),
                "{service}"
            );
        }
        assert!(conf.contains(
            "service doveadm {\n  inet_listener {\n    port = 12345\n  }\n}\n\
             !include_try /var/lib/mailpod/dovecot/doveadm.conf\n\
             !include_try /var/lib/mailpod/dovecot/site-tls.conf\n"
        ));
    }

    #[test]
    fn store_quota_default_and_overrides() {
        use crate::mailconfig::settings::QuotaSettings;
        use crate::mailconfig::tables::MailboxQuota;
        let mut s = settings(false);
        let plain = dovecot_conf(
            Role::Store,
            &s,
            &Layout::default(),
            &Ports::default(),
            Path::new("/u"),
        );
        assert!(
            !plain.contains("quota_rule") && !plain.contains("$mail_plugins quota"),
            "no quota unless the spec asks"
        );
        s.features.quota = Some(QuotaSettings {
            storage_bytes: 1 << 30,
            messages: Some(5000),
            tempfail: true,
        });
        let conf = dovecot_conf(
            Role::Store,
            &s,
            &Layout::default(),
            &Ports::default(),
            Path::new("/u"),
        );
        assert!(conf.contains(
            "mail_plugins = $mail_plugins quota\nquota_full_tempfail = yes\nlmtp_rcpt_check_quota = yes\n\
             protocol imap {\n  mail_plugins = $mail_plugins imap_quota\n}\n\
             plugin {\n  quota = count:User quota\n  quota_vsizes = yes\n  quota_rule = *:storage=1073741824B\n  quota_rule2 = *:messages=5000\n}\n"
        ), "{conf}");
        s.features.quota.as_mut().unwrap().tempfail = false;
        let imap = dovecot_conf(
            Role::Imap,
            &s,
            &Layout::default(),
            &Ports::default(),
            Path::new("/u"),
        );
        assert!(!imap.contains("quota"), "proxies enforce no quota");

        let mut t = AccessTables::default();
        t.mailboxes.insert("a@example.com".into(), 0);
        t.mailboxes.insert("b@example.com".into(), 0);
        t.quotas.insert(
            "b@example.com".into(),
            MailboxQuota {
                storage_bytes: Some(0),
                messages: Some(10),
            },
        );
        assert_eq!(
            store_userdb(&t, Path::new("/m")),
            "a@example.com:::::::\nb@example.com:::::::userdb_quota_rule=*:storage=0B userdb_quota_rule2=*:messages=10\n"
        );
        // Taken back after a removal: a home of its own, the quota fields as before.
        t.incarnations.insert("b@example.com".into(), 2);
        assert_eq!(
            store_userdb(&t, Path::new("/m")),
            "a@example.com:::::::\nb@example.com:::::/m/.incarnation-2/example.com/b::userdb_quota_rule=*:storage=0B userdb_quota_rule2=*:messages=10\n"
        );
    }

    #[test]
    fn sieve_relay_and_imap_proxy_forwards_managesieve() {
        let mut s = settings(false);
        s.features.sieve.relay = Some("relay.mail.svc.cluster.local:25".into());
        let ports = Ports {
            sieve: 30190,
            ..Ports::default()
        };
        let store = dovecot_conf(Role::Store, &s, &Layout::default(), &ports, Path::new("/u"));
        assert!(store.contains("submission_host = relay.mail.svc.cluster.local:25\n"));
        assert!(store.contains(
            "plugin {\n  sieve = file:~/sieve;active=~/.dovecot.sieve\n  sieve_max_script_size = 65536\n  sieve_quota_max_scripts = 10\n}\n"
        ));
        assert!(store.contains("lda_mailbox_autocreate = yes\n"));
        assert!(store.contains("inet_listener sieve {\n    port = 30190\n"));
        let imap = dovecot_conf(Role::Imap, &s, &Layout::default(), &ports, Path::new("/u"));
        assert!(imap.contains("protocols = imap sieve\n"));
        assert!(imap
            .contains("service managesieve-login {\n  inet_listener sieve {\n    port = 30190\n"));
        assert!(imap.contains("args = /var/lib/mailpod/dovecot/proxy-passdb-%s\n"));
        assert!(
            !imap.contains("sieve_max_script_size"),
            "proxies run no scripts"
        );
    }

    #[test]
    fn site_tls_serves_doveadm_over_tls_and_keeps_the_mail_protocols_plain() {
        assert_eq!(
            site_tls_conf(None, 12346, "x"),
            "",
            "no certificate: no listener"
        );
        let conf = site_tls_conf(Some(Path::new("/etc/mailpod/site-tls")), 12346, "ab12");
        assert!(conf.starts_with("# Cross-site replication over TLS; certificate digest ab12\n"));
        // Dovecot opens no ssl listener while the global ssl is no.
        assert!(conf.contains(
            "ssl = yes\nssl_cert = </etc/mailpod/site-tls/tls.crt\nssl_key = </etc/mailpod/site-tls/tls.key\n"
        ));
        for protocol in ["imap", "pop3", "lmtp", "sieve"] {
            assert!(
                conf.contains(&format!("protocol {protocol} {{\n  ssl = no\n}}\n")),
                "{protocol}: {conf}"
            );
        }
        assert!(conf.ends_with(
            "service doveadm {\n  inet_listener doveadm-tls {\n    port = 12346\n    ssl = yes\n  }\n}\n"
        ));
        assert_ne!(
            conf,
            site_tls_conf(Some(Path::new("/etc/mailpod/site-tls")), 12346, "cd34"),
            "a renewed certificate changes the file, which asks for a reload"
        );
    }

    #[test]
    fn doveadm_password_is_quoted() {
        assert_eq!(doveadm_password_conf(None), "");
        assert_eq!(
            doveadm_password_conf(Some(r#"s3"c\t"#)),
            "doveadm_password = \"s3\\\"c\\\\t\"\n"
        );
    }

    #[test]
    fn proxies_terminate_tls_and_use_the_generated_passdb() {
        let layout = Layout::under(Path::new("/t"));
        let ports = Ports {
            listen: "127.0.0.1".into(),
            pop3: 30110,
            ..Ports::default()
        };
        let conf = dovecot_conf(
            Role::Pop3,
            &settings(true),
            &layout,
            &ports,
            Path::new("/unused"),
        );
        assert!(conf.contains("protocols = pop3\n"));
        assert!(conf.contains("listen = 127.0.0.1\n"));
        assert!(conf.contains("ssl = required\nssl_cert = </t/tls/tls.crt\n"));
        assert!(conf.contains("disable_plaintext_auth = yes\n"));
        assert!(conf.contains("args = /t/dovecot/proxy-passdb-%s\n"));
        assert!(
            !conf.contains("inet_listener sieve"),
            "pop3 proxies forward no ManageSieve"
        );
        assert!(conf.contains("port = 30110"));
        assert!(!conf.contains("inet_listener imap "));
        assert!(
            conf.contains("inet_listener pop3s {\n    port = 995\n    ssl = yes\n  }"),
            "implicit TLS listens with a certificate: {conf}"
        );
        let plain = dovecot_conf(
            Role::Imap,
            &settings(false),
            &layout,
            &ports,
            Path::new("/u"),
        );
        assert!(
            plain.contains("inet_listener imaps {\n    port = 0\n  }"),
            "{plain}"
        );
    }

    #[test]
    fn submission_auth_socket_for_postfix() {
        let layout = Layout::under(Path::new("/t"));
        let conf = dovecot_conf(
            Role::Submission,
            &settings(false),
            &layout,
            &Ports::default(),
            Path::new("/u"),
        );
        assert!(conf.contains("protocols = none\n"));
        assert!(conf.contains(
            "unix_listener /t/dovecot-run/auth-postfix {\n    mode = 0660\n    user = postfix\n"
        ));
        assert!(conf.contains("args = /u\n"));
    }
}
