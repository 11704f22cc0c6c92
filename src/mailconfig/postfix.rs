//! Postfix configuration of the `mx` and `submission` roles: main.cf, master.cf and the lookup-table
//! sources (compiled with `postmap lmdb:` by the agent).
//!
//! All lookup tables are lmdb maps: Postfix daemons notice a changed map file and restart themselves after
//! the current session, so an access-table change needs no `postfix reload`. Only main.cf/master.cf
//! changes (mail settings) need one.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::layout::{Layout, Ports, Role};
use super::settings::MailSettings;
use super::tables::AccessTables;

/// Map sources, by file name under [`Layout::postfix_maps`].
pub mod maps {
    pub const VIRTUAL_MAILBOX_DOMAINS: &str = "virtual_mailbox_domains";
    pub const VIRTUAL_MAILBOX_MAPS: &str = "virtual_mailbox_maps";
    pub const VIRTUAL_ALIAS_MAPS: &str = "virtual_alias_maps";
    pub const TRANSPORT: &str = "transport";
    pub const RELAY_DOMAINS: &str = "relay_domains";
    pub const RECIPIENT_ACCESS: &str = "recipient_access";
    pub const SENDER_ACCESS: &str = "sender_access";
    pub const RECIPIENT_BCC: &str = "recipient_bcc";
    pub const SENDER_BCC: &str = "sender_bcc";
    /// Envelope sender -> the SASL logins that may use it (submission's `smtpd_sender_login_maps`).
    pub const SENDER_LOGIN: &str = "sender_login";
    /// The recipients relay domains take (`relay_recipient_maps`): listed addresses, and `@domain` for a
    /// relay domain whose recipients its next hop verifies.
    pub const RELAY_RECIPIENTS: &str = "relay_recipients";
    /// Relay domain -> `reject_unverified_recipient`, for relay domains with no recipient list.
    pub const RELAY_VERIFY: &str = "relay_verify";
    pub const ALL: [&str; 12] = [
        VIRTUAL_MAILBOX_DOMAINS,
        VIRTUAL_MAILBOX_MAPS,
        VIRTUAL_ALIAS_MAPS,
        TRANSPORT,
        RELAY_DOMAINS,
        RECIPIENT_ACCESS,
        SENDER_ACCESS,
        RECIPIENT_BCC,
        SENDER_BCC,
        SENDER_LOGIN,
        RELAY_RECIPIENTS,
        RELAY_VERIFY,
    ];
}

/// The source text of every lookup table, keyed by file name (each is `key value` lines for `postmap`).
///
/// A mailbox whose LUN has no endpoint in the tables is routed to an LMTP socket that does not exist: mx
/// accepts its mail (the `retry` transport would answer 450 at RCPT and leave it in the sender's queue),
/// and each attempt defers with a temporary `connect ... No such file` (4.4.1), so the mail waits in our
/// queue until the LUN has an endpoint and the agent retries it there (agent::store_flush).
pub fn map_sources(tables: &AccessTables) -> BTreeMap<&'static str, String> {
    let mut out = BTreeMap::new();
    let mut put = |name: &'static str, lines: Vec<String>| {
        let mut text = String::new();
        for l in lines {
            let _ = writeln!(text, "{l}");
        }
        out.insert(name, text);
    };
    put(
        maps::VIRTUAL_MAILBOX_DOMAINS,
        tables.domains.iter().map(|d| format!("{d} OK")).collect(),
    );
    put(
        maps::VIRTUAL_MAILBOX_MAPS,
        tables
            .mailboxes
            .iter()
            .map(|(m, lun)| format!("{m} lun-{lun}"))
            .collect(),
    );
    let mut transport: Vec<String> = tables
        .mailboxes
        .iter()
        .map(|(m, lun)| match tables.luns.get(lun) {
            Some(e) => format!("{m} lmtp:inet:{}:{}", e.host, e.lmtp_port),
            None => format!("{m} lmtp:unix:lun-{lun}-has-no-store-endpoint-yet"),
        })
        .collect();
    transport.extend(
        tables
            .relay_domains
            .iter()
            .filter(|(_, hop)| !hop.is_empty())
            .map(|(d, hop)| format!("{d} smtp:{hop}")),
    );
    put(maps::TRANSPORT, transport);
    put(
        maps::RELAY_DOMAINS,
        tables
            .relay_domains
            .keys()
            .map(|d| format!("{d} OK"))
            .collect(),
    );
    // A relay domain with a recipient list takes exactly those; one without is asked at RCPT.
    let listed = |d: &str| {
        let suffix = format!("@{d}");
        tables.relay_recipients.iter().any(|r| r.ends_with(&suffix))
    };
    let mut relay_recipients: Vec<String> = tables
        .relay_recipients
        .iter()
        .map(|r| format!("{r} OK"))
        .collect();
    let verified: Vec<&String> = tables
        .relay_domains
        .keys()
        .filter(|d| !listed(d.as_str()))
        .collect();
    relay_recipients.extend(verified.iter().map(|d| format!("@{d} OK")));
    put(maps::RELAY_RECIPIENTS, relay_recipients);
    put(
        maps::RELAY_VERIFY,
        verified
            .iter()
            .map(|d| format!("{d} reject_unverified_recipient"))
            .collect(),
    );
    put(
        maps::VIRTUAL_ALIAS_MAPS,
        tables
            .aliases
            .iter()
            .map(|(a, t)| format!("{a} {}", t.join(", ")))
            .collect(),
    );
    put(
        maps::RECIPIENT_ACCESS,
        tables
            .recipient_access
            .iter()
            .map(|e| format!("{} {}", e.pattern, e.action))
            .collect(),
    );
    put(
        maps::SENDER_ACCESS,
        tables
            .sender_access
            .iter()
            .map(|e| format!("{} {}", e.pattern, e.action))
            .collect(),
    );
    put(
        maps::RECIPIENT_BCC,
        tables
            .recipient_bcc
            .iter()
            .map(|(p, b)| format!("{p} {b}"))
            .collect(),
    );
    put(
        maps::SENDER_BCC,
        tables
            .sender_bcc
            .iter()
            .map(|(p, b)| format!("{p} {b}"))
            .collect(),
    );
    put(maps::SENDER_LOGIN, sender_logins(tables));
    out
}

/// Who may send as whom on submission: a mailbox as itself (its login is its address), an alias as each
/// mailbox it delivers to. An alias for a whole domain (`@example.com`) gives nobody that domain, and an
/// address with no line here is nobody's: `reject_sender_login_mismatch` refuses it to every login.
fn sender_logins(tables: &AccessTables) -> Vec<String> {
    let mut owners: BTreeMap<&str, Vec<&str>> = tables
        .mailboxes
        .keys()
        .map(|m| (m.as_str(), vec![m.as_str()]))
        .collect();
    for (alias, targets) in &tables.aliases {
        if alias.starts_with('@') {
            continue;
        }
        let logins: Vec<&str> = targets
            .iter()
            .map(String::as_str)
            .filter(|t| tables.mailboxes.contains_key(*t))
            .collect();
        if !logins.is_empty() {
            let e = owners.entry(alias.as_str()).or_default();
            e.extend(logins);
            e.sort_unstable();
            e.dedup();
        }
    }
    owners
        .into_iter()
        .map(|(address, logins)| format!("{address} {}", logins.join(", ")))
        .collect()
}

/// main.cf for `role` (mx or submission).
pub fn main_cf(role: Role, settings: &MailSettings, layout: &Layout, ports: &Ports) -> String {
    let map = |name: &str| format!("lmdb:{}/{name}", layout.postfix_maps().display());
    let all_interfaces = ports.listen == "0.0.0.0";
    let mut p: Vec<(&str, String)> = vec![
        ("compatibility_level", "3.6".into()),
        (
            "queue_directory",
            layout.postfix_queue.display().to_string(),
        ),
        ("data_directory", layout.postfix_data.display().to_string()),
        ("mail_owner", "postfix".into()),
        ("setgid_group", "postdrop".into()),
        // Postfix logs fatal errors to syslog only when stderr is not a terminal; pods have no syslog.
        ("maillog_file", layout.postfix_log().display().to_string()),
        (
            "maillog_file_prefixes",
            layout.log_dir.display().to_string(),
        ),
        ("myhostname", settings.hostname.clone()),
        ("myorigin", "$myhostname".into()),
        // Every domain is virtual: nothing is delivered locally in a mail pod.
        ("mydestination", String::new()),
        ("local_recipient_maps", String::new()),
        (
            "local_transport",
            "error:5.1.1 local delivery is disabled".into(),
        ),
        ("alias_maps", String::new()),
        ("alias_database", String::new()),
        (
            "inet_interfaces",
            if all_interfaces {
                "all".into()
            } else {
                ports.listen.clone()
            },
        ),
        (
            "inet_protocols",
            if all_interfaces { "all" } else { "ipv4" }.into(),
        ),
        // Nobody is trusted by address: a client on loopback may be a port-forward or a mesh sidecar
        // (127.0.0.6) relaying for anyone, and nothing in a mail pod sends through its own smtpd.
        ("mynetworks", String::new()),
        ("smtpd_banner", "$myhostname ESMTP".into()),
        ("biff", "no".into()),
        ("append_dot_mydomain", "no".into()),
        ("readme_directory", "no".into()),
        ("message_size_limit", settings.max_message_bytes.to_string()),
        ("mailbox_size_limit", "0".into()),
        ("virtual_mailbox_limit", "0".into()),
        // Retry timing stays Postfix's default (one schedule for every transport, sane for the internet);
        // mail that waited for a paused or absent store is retried by the agent when it returns
        // (agent::store_flush).
        (
            "virtual_mailbox_domains",
            map(maps::VIRTUAL_MAILBOX_DOMAINS),
        ),
        ("virtual_mailbox_maps", map(maps::VIRTUAL_MAILBOX_MAPS)),
        ("virtual_alias_maps", map(maps::VIRTUAL_ALIAS_MAPS)),
        // Every listed mailbox has its own transport entry (its LUN, or a missing socket while the LUN has no
        // endpoint); what falls through to the default is no mailbox at all, and smtpd refuses a
        // recipient whose transport is `error` at RCPT (550, no bounce later).
        (
            "virtual_transport",
            "error:5.1.1 mailbox unavailable".into(),
        ),
        ("transport_maps", map(maps::TRANSPORT)),
        ("relay_domains", map(maps::RELAY_DOMAINS)),
        // Unknown recipients of relay domains are refused at RCPT, never accepted and bounced later.
        ("relay_recipient_maps", map(maps::RELAY_RECIPIENTS)),
        // A recipient the next hop refuses is refused here for good (Postfix's default is 450).
        ("unverified_recipient_reject_code", "550".into()),
        ("recipient_bcc_maps", map(maps::RECIPIENT_BCC)),
        ("sender_bcc_maps", map(maps::SENDER_BCC)),
        (
            "smtpd_sender_restrictions",
            format!("check_sender_access {}", map(maps::SENDER_ACCESS)),
        ),
        (
            "smtpd_recipient_restrictions",
            format!(
                "check_recipient_access {}, check_recipient_access {}",
                map(maps::RECIPIENT_ACCESS),
                map(maps::RELAY_VERIFY)
            ),
        ),
        ("smtp_tls_security_level", "may".into()),
        ("lmtp_tls_security_level", "none".into()),
        // A store that drops packets (its node gone, a LUN Service with no endpoint behind a
        // NetworkPolicy) would otherwise hold the delivery for the kernel's SYN retries, about two
        // minutes, out of the deferred queue that the agent retries the moment the store takes mail.
        ("lmtp_connect_timeout", "10s".into()),
    ];
    if settings.tls {
        let tls = |f: &str| layout.tls_dir.join(f).display().to_string();
        p.push(("smtpd_tls_cert_file", tls("tls.crt")));
        p.push(("smtpd_tls_key_file", tls("tls.key")));
        p.push(("smtpd_tls_auth_only", "yes".into()));
    }
    match role {
        Role::Mx => {
            p.push((
                "smtpd_relay_restrictions",
                "reject_unauth_destination".into(),
            ));
            p.push((
                "smtpd_tls_security_level",
                if settings.tls { "may" } else { "none" }.into(),
            ));
            // anvil: new connections per client per minute; postscreen throttles before smtpd sees them.
            p.push(("anvil_rate_time_unit", "60s".into()));
            p.push((
                "smtpd_client_connection_rate_limit",
                settings.connection_rate_limit.to_string(),
            ));
            p.push(("postscreen_greet_action", "enforce".into()));
            if !settings.dnsbl.is_empty() {
                p.push(("postscreen_dnsbl_sites", settings.dnsbl.join(", ")));
                p.push((
                    "postscreen_dnsbl_threshold",
                    settings.dnsbl_threshold.max(1).to_string(),
                ));
                p.push(("postscreen_dnsbl_action", "enforce".into()));
            }
            if let Some(filter) = &settings.filter {
                p.extend(super::rspamd::milter_params(filter));
            }
        }
        Role::Submission => {
            // An authenticated user sends only as its own mailbox or an alias that delivers to it. Not
            // `reject_known_sender_login_mismatch`: that lets any login use every address absent from the
            // map, such as another domain's.
            p.push(("smtpd_sender_login_maps", map(maps::SENDER_LOGIN)));
            if let Some((_, v)) = p
                .iter_mut()
                .find(|(k, _)| *k == "smtpd_sender_restrictions")
            {
                *v = format!("reject_sender_login_mismatch, {v}");
            }
            if let Some(signer) = &settings.signer {
                p.extend(super::rspamd::milter_params(signer));
            }
            p.push(("smtpd_sasl_auth_enable", "yes".into()));
            p.push(("smtpd_sasl_type", "dovecot".into()));
            p.push((
                "smtpd_sasl_path",
                layout.sasl_socket().display().to_string(),
            ));
            p.push(("smtpd_sasl_security_options", "noanonymous".into()));
            p.push((
                "smtpd_client_restrictions",
                "permit_sasl_authenticated, reject".into(),
            ));
            p.push((
                "smtpd_relay_restrictions",
                "permit_sasl_authenticated, reject".into(),
            ));
            p.push((
                "smtpd_tls_security_level",
                if settings.tls { "encrypt" } else { "none" }.into(),
            ));
        }
        Role::Imap | Role::Pop3 | Role::Store => {}
    }
    let mut out = format!(
        "# Rendered by mailpod-operator agent for role {role} of MailPod {}; edits are overwritten.\n",
        settings.mailpod
    );
    for (k, v) in p {
        if v.is_empty() {
            let _ = writeln!(out, "{k} =");
        } else {
            let _ = writeln!(out, "{k} = {v}");
        }
    }
    out
}

/// master.cf for `role`: the internal services (no chroot: the pod is the sandbox) plus the role's
/// listeners. With a certificate (`tls`) submission also answers implicit TLS (RFC 8314 `submissions`,
/// port 465); without one nothing listens there.
pub fn master_cf(role: Role, ports: &Ports, tls: bool) -> String {
    let endpoint = |port: u16| {
        if ports.listen == "0.0.0.0" {
            port.to_string()
        } else {
            format!("{}:{port}", ports.listen)
        }
    };
    let mut out = String::from("# service type  private unpriv  chroot  wakeup  maxproc command\n");
    match role {
        Role::Mx => {
            let _ = writeln!(out, "{} inet n - n - 1 postscreen", endpoint(ports.smtp));
            out.push_str("smtpd pass - - n - - smtpd\n");
            out.push_str("dnsblog unix - - n - 0 dnsblog\n");
            out.push_str("tlsproxy unix - - n - 0 tlsproxy\n");
        }
        Role::Submission => {
            let _ = writeln!(out, "{} inet n - n - - smtpd", endpoint(ports.submission));
            out.push_str("  -o syslog_name=postfix/submission\n");
            if tls {
                let _ = writeln!(out, "{} inet n - n - - smtpd", endpoint(ports.submissions));
                out.push_str(
                    "  -o syslog_name=postfix/submissions\n  -o smtpd_tls_wrappermode=yes\n  -o smtpd_tls_security_level=encrypt\n",
                );
            }
        }
        Role::Imap | Role::Pop3 | Role::Store => {}
    }
    out.push_str(
        "pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
  -o syslog_name=postfix/$service_name
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
lmtp unix - - n - - lmtp
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailconfig::tables::{AccessEntry, LunEndpoint};

    fn settings() -> MailSettings {
        MailSettings {
            mailpod: "corp".into(),
            hostname: "mail.example.com".into(),
            max_message_bytes: 1000,
            connection_rate_limit: 30,
            dnsbl: vec![
                "zen.spamhaus.org=127.0.0.[2..11]*2".into(),
                "bl.spamcop.net=127.0.0.2".into(),
            ],
            dnsbl_threshold: 2,
            tls: true,
            features: Default::default(),
            filter: None,
            signer: None,
        }
    }

    fn tables() -> AccessTables {
        let mut t = AccessTables {
            domains: vec!["example.com".into()],
            ..Default::default()
        };
        t.mailboxes.insert("a@example.com".into(), 0);
        t.mailboxes.insert("b@example.com".into(), 1);
        t.mailboxes.insert("c@example.com".into(), 7);
        t.luns.insert(
            0,
            LunEndpoint::in_cluster("corp-lun-0.mail.svc.cluster.local"),
        );
        t.luns.insert(
            1,
            LunEndpoint::in_cluster("corp-lun-1.mail.svc.cluster.local"),
        );
        t.relay_domains
            .insert("partner.net".into(), "[mx.partner.net]:25".into());
        t.relay_domains
            .insert("mx-lookup.net".into(), String::new());
        t.aliases.insert(
            "sales@example.com".into(),
            vec!["a@example.com".into(), "b@example.com".into()],
        );
        t.recipient_access.push(AccessEntry {
            pattern: "spam@example.com".into(),
            action: "REJECT no thanks".into(),
        });
        t.recipient_bcc
            .insert("@example.com".into(), "archive@example.com".into());
        t
    }

    #[test]
    fn transport_routes_each_mailbox_to_its_lun() {
        let m = map_sources(&tables());
        assert_eq!(
            m[maps::TRANSPORT],
            "a@example.com lmtp:inet:corp-lun-0.mail.svc.cluster.local:24\n\
             b@example.com lmtp:inet:corp-lun-1.mail.svc.cluster.local:24\n\
             c@example.com lmtp:unix:lun-7-has-no-store-endpoint-yet\n\
             partner.net smtp:[mx.partner.net]:25\n"
        );
        assert_eq!(m[maps::RELAY_DOMAINS], "mx-lookup.net OK\npartner.net OK\n");
        // No recipient list anywhere: both relay domains are verified with their next hop.
        assert_eq!(
            m[maps::RELAY_RECIPIENTS],
            "@mx-lookup.net OK\n@partner.net OK\n"
        );
        assert_eq!(
            m[maps::RELAY_VERIFY],
            "mx-lookup.net reject_unverified_recipient\npartner.net reject_unverified_recipient\n"
        );
        let mut listed = tables();
        listed.relay_recipients.insert("amy@partner.net".into());
        let m = map_sources(&listed);
        assert_eq!(
            m[maps::RELAY_RECIPIENTS],
            "amy@partner.net OK\n@mx-lookup.net OK\n"
        );
        assert_eq!(
            m[maps::RELAY_VERIFY],
            "mx-lookup.net reject_unverified_recipient\n"
        );
        assert_eq!(
            m[maps::VIRTUAL_ALIAS_MAPS],
            "sales@example.com a@example.com, b@example.com\n"
        );
        assert_eq!(
            m[maps::RECIPIENT_ACCESS],
            "spam@example.com REJECT no thanks\n"
        );
        assert_eq!(m[maps::RECIPIENT_BCC], "@example.com archive@example.com\n");
        assert_eq!(m[maps::SENDER_BCC], "");
        assert_eq!(m.len(), maps::ALL.len());
    }

    #[test]
    fn each_address_is_owned_by_its_mailbox_or_the_mailboxes_its_alias_reaches() {
        let mut t = tables();
        t.aliases.insert(
            "sales@example.com".into(),
            vec![
                "b@example.com".into(),
                "a@example.com".into(),
                "x@remote.test".into(),
            ],
        );
        t.aliases
            .insert("fwd@example.com".into(), vec!["x@remote.test".into()]);
        t.aliases
            .insert("@example.com".into(), vec!["a@example.com".into()]);
        // An alias with the name of a mailbox adds owners to it.
        t.aliases
            .insert("c@example.com".into(), vec!["a@example.com".into()]);
        assert_eq!(
            map_sources(&t)[maps::SENDER_LOGIN],
            "a@example.com a@example.com\n\
             b@example.com b@example.com\n\
             c@example.com a@example.com, c@example.com\n\
             sales@example.com a@example.com, b@example.com\n"
        );
        let cf = main_cf(
            Role::Submission,
            &settings(),
            &Layout::default(),
            &Ports::default(),
        );
        for line in [
            "smtpd_sender_login_maps = lmdb:/var/lib/mailpod/postfix/maps/sender_login",
            "smtpd_sender_restrictions = reject_sender_login_mismatch, check_sender_access lmdb:/var/lib/mailpod/postfix/maps/sender_access",
        ] {
            assert!(cf.lines().any(|l| l == line), "missing `{line}` in\n{cf}");
        }
        let mx = main_cf(Role::Mx, &settings(), &Layout::default(), &Ports::default());
        assert!(
            !mx.contains("sender_login"),
            "mx takes mail from the internet: {mx}"
        );
    }

    #[test]
    fn mx_limits_and_dnsbl() {
        let cf = main_cf(Role::Mx, &settings(), &Layout::default(), &Ports::default());
        for line in [
            "message_size_limit = 1000",
            "smtpd_client_connection_rate_limit = 30",
            "postscreen_dnsbl_sites = zen.spamhaus.org=127.0.0.[2..11]*2, bl.spamcop.net=127.0.0.2",
            "postscreen_dnsbl_threshold = 2",
            "transport_maps = lmdb:/var/lib/mailpod/postfix/maps/transport",
            "smtpd_recipient_restrictions = check_recipient_access lmdb:/var/lib/mailpod/postfix/maps/recipient_access, check_recipient_access lmdb:/var/lib/mailpod/postfix/maps/relay_verify",
            "relay_recipient_maps = lmdb:/var/lib/mailpod/postfix/maps/relay_recipients",
            "unverified_recipient_reject_code = 550",
            "maillog_file = /var/log/mailpod/postfix.log",
            "inet_interfaces = all",
            "smtpd_tls_security_level = may",
        ] {
            assert!(cf.lines().any(|l| l == line), "missing `{line}` in\n{cf}");
        }
        assert!(!cf.contains("smtpd_sasl_auth_enable"));
        assert!(cf.contains("\nmynetworks =\n"), "no network is trusted");
        assert!(!cf.contains("permit_mynetworks"), "{cf}");
        let master = master_cf(Role::Mx, &Ports::default(), true);
        assert!(master.starts_with("# service"));
        assert!(master.contains("\n25 inet n - n - 1 postscreen\nsmtpd pass"));
    }

    #[test]
    fn submission_requires_tls_and_auth() {
        let layout = Layout::under(std::path::Path::new("/t"));
        let ports = Ports {
            listen: "127.0.0.1".into(),
            submission: 30587,
            ..Ports::default()
        };
        let cf = main_cf(Role::Submission, &settings(), &layout, &ports);
        for line in [
            "smtpd_sasl_auth_enable = yes",
            "smtpd_sasl_type = dovecot",
            "smtpd_sasl_path = /t/dovecot-run/auth-postfix",
            "smtpd_tls_security_level = encrypt",
            "smtpd_tls_auth_only = yes",
            "smtpd_relay_restrictions = permit_sasl_authenticated, reject",
            "inet_interfaces = 127.0.0.1",
        ] {
            assert!(cf.lines().any(|l| l == line), "missing `{line}` in\n{cf}");
        }
        assert!(!cf.contains("postscreen"));
        let master = master_cf(Role::Submission, &ports, true);
        assert!(master.contains("127.0.0.1:30587 inet n - n - - smtpd\n"));
        assert!(master.contains(
            "127.0.0.1:465 inet n - n - - smtpd\n  -o syslog_name=postfix/submissions\n  -o smtpd_tls_wrappermode=yes\n"
        ));
        assert!(
            !master_cf(Role::Submission, &ports, false).contains("wrappermode"),
            "no implicit TLS without a certificate"
        );
        let plain = main_cf(
            Role::Submission,
            &MailSettings {
                tls: false,
                ..settings()
            },
            &layout,
            &ports,
        );
        assert!(plain.contains("smtpd_tls_security_level = none\n"));
        assert!(!plain.contains("smtpd_tls_cert_file"));
    }
}
