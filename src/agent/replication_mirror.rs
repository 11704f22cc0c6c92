//! A standby's mirror pass under the deletion guard (agent::replication_guard), with the real doveadm.
//!
//! The pass first compares every mailbox this replica holds with the source; then mirrors mailbox by
//! mailbox (`doveadm backup -R -u`), a few at a time, asking the source again just before each one, so
//! that a wipe that starts during the pass is caught too: its losses add to the running total, and once
//! that is beyond the limit every further mailbox that would lose mail is withheld. A wipe racing the
//! pass thus takes at most the allowed share (plus the mailboxes in flight), never the whole LUN. The
//! mailboxes that lose nothing are mirrored even while a pass is refused, so their new mail still comes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::replication_guard::{assess, Admission, Folder, Guard, Mailboxes, Refused};

/// Mailboxes mirrored (and source queries made) at once.
const CONCURRENT: usize = 4;

#[derive(Deserialize)]
struct StatusRow {
    #[serde(default)]
    username: Option<String>,
    mailbox: String,
    messages: String,
    uidvalidity: String,
}

/// Parses `doveadm -f json mailbox status 'messages uidvalidity'` into `out`; rows without a `username`
/// (a single `-u` user) belong to `user`.
pub fn parse_status(json: &[u8], user: Option<&str>, out: &mut Mailboxes) -> Result<()> {
    let rows: Vec<StatusRow> = serde_json::from_slice(json).context("doveadm's JSON")?;
    for r in rows {
        let Some(mailbox) = r.username.or_else(|| user.map(String::from)) else {
            bail!("a status row without a user");
        };
        let folder = Folder {
            messages: r.messages.parse().context("messages")?,
            uidvalidity: r.uidvalidity.parse().context("uidvalidity")?,
        };
        out.entry(mailbox).or_default().insert(r.mailbox, folder);
    }
    Ok(())
}

/// A doveadm service a pass pulls from, and how doveadm reaches it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    /// `host:port`.
    pub addr: String,
    /// Across sites: only over TLS, the peer's certificate and host name verified against this CA.
    /// `None`: the LUN's own active, over the plain listener inside the cluster.
    pub ca_file: Option<PathBuf>,
}

impl Remote {
    /// doveadm's global settings for this remote. Dovecot 2.3.19: dsync's `tcps:` target does TLS by
    /// itself, but `-S host:port` (the mailbox status a guarded pass asks the source for, the hand-over's
    /// fetch and save) uses TLS only with `doveadm_ssl = ssl` *and* a non-zero `doveadm_port` (with port 0
    /// doveadm never looks at `doveadm_ssl` and speaks in clear). `ssl_client_require_valid_cert = yes`
    /// (Dovecot's default, stated) makes both refuse a certificate the CA did not sign or that does not
    /// name the host.
    pub fn options(&self) -> Vec<String> {
        let Some(ca) = &self.ca_file else {
            return vec![];
        };
        let port = self.addr.rsplit(':').next().unwrap_or_default();
        [
            "doveadm_ssl=ssl".to_string(),
            format!("doveadm_port={port}"),
            format!("ssl_client_ca_file={}", ca.display()),
            "ssl_client_require_valid_cert=yes".to_string(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect()
    }

    /// The dsync destination of `doveadm backup`.
    pub fn dsync_target(&self) -> String {
        let scheme = if self.ca_file.is_some() {
            "tcps"
        } else {
            "tcp"
        };
        format!("{scheme}:{}", self.addr)
    }
}

impl std::fmt::Display for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.addr)
    }
}

/// Runs doveadm; success, stdout and the last lines of stderr.
async fn doveadm(conf: &Path, args: &[&str]) -> Result<(bool, Vec<u8>, String)> {
    let out = tokio::process::Command::new("doveadm")
        .arg("-c")
        .arg(conf)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .context("running doveadm")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
    let tail = tail.into_iter().rev().collect::<Vec<_>>().join(" | ");
    Ok((out.status.success(), out.stdout, tail))
}

const STATUS: [&str; 6] = [
    "-f",
    "json",
    "mailbox",
    "status",
    "messages uidvalidity",
    "*",
];

/// What this replica holds for the mailboxes in `users_list` (one per line): one local doveadm run.
pub async fn held(conf: &Path, users_list: &Path) -> Result<Mailboxes> {
    let list = users_list.display().to_string();
    let (ok, stdout, stderr) =
        doveadm(conf, &[&STATUS[..4], &["-F", &list], &STATUS[4..]].concat()).await?;
    let mut out = Mailboxes::new();
    // A mailbox doveadm skips is reported on stderr with a non-zero exit; the others are still listed.
    if let Err(e) = parse_status(&stdout, None, &mut out) {
        bail!("status of this replica's mailboxes (ok: {ok}): {e:#}: {stderr}");
    }
    Ok(out)
}

/// What `source` holds for one mailbox.
pub async fn at_source(conf: &Path, source: &Remote, user: &str) -> Result<Mailboxes> {
    let options = source.options();
    let mut args: Vec<&str> = options.iter().map(String::as_str).collect();
    args.extend(STATUS[..4].iter().copied());
    args.extend(["-S", source.addr.as_str(), "-u", user]);
    args.extend(STATUS[4..].iter().copied());
    let (ok, stdout, stderr) = doveadm(conf, &args).await?;
    if !ok {
        bail!("doveadm mailbox status of {user} on {source}: {stderr}");
    }
    let mut out = Mailboxes::new();
    parse_status(&stdout, Some(user), &mut out)
        .with_context(|| format!("status of {user} on {source}"))?;
    out.entry(user.to_string()).or_default();
    Ok(out)
}

/// `doveadm backup -R` of one mailbox from `source`: this replica becomes an exact copy of it.
async fn backup(conf: &Path, source: &Remote, user: &str) -> Result<()> {
    let target = source.dsync_target();
    let options = source.options();
    let mut args: Vec<&str> = options.iter().map(String::as_str).collect();
    args.extend(["backup", "-R", "-u", user, &target]);
    let (ok, _, stderr) = doveadm(conf, &args).await?;
    if !ok {
        bail!("doveadm backup -R of {user} from {source}: {stderr}");
    }
    Ok(())
}

/// One guarded mirror pass.
pub struct MirrorPass<'a> {
    pub conf: &'a Path,
    pub source: &'a Remote,
    /// The LUN's mailboxes.
    pub users: &'a [String],
    /// What this replica held at most within the window (see `Guard::reference`).
    pub reference: Mailboxes,
    pub max_percent: u32,
    pub confirmation: Option<String>,
}

/// What a pass did: `Ok(true)` when a confirmation let deletions beyond the limit through; `Refused`
/// when mailboxes were withheld.
pub async fn mirror(pass: MirrorPass<'_>, guard: &Mutex<Guard>) -> Result<bool> {
    use futures::StreamExt;
    let holding =
        |m: &Mailboxes, u: &str| m.get(u).is_some_and(|f| f.values().any(|f| f.messages > 0));
    // First every mailbox that holds mail here, so that a wipe done before the pass is refused whole.
    // The streams take owned items: the pass runs in a spawned task, and a stream of borrowed items ties
    // its closures to one lifetime.
    let to_query: Vec<String> = pass
        .users
        .iter()
        .filter(|u| holding(&pass.reference, u))
        .cloned()
        .collect();
    let queried: Vec<Result<Mailboxes>> = futures::stream::iter(to_query)
        .map(|u| async move { at_source(pass.conf, pass.source, &u).await })
        .buffer_unordered(CONCURRENT)
        .collect()
        .await;
    let mut running = Mailboxes::new();
    for q in queried {
        running.extend(q?);
    }
    let running = Mutex::new(running);
    let confirmed = Mutex::new(false);
    let withheld = Mutex::new(BTreeSet::new());
    let confirmation = pass.confirmation.as_deref();
    let results: Vec<Result<()>> = futures::stream::iter(pass.users.to_vec())
        .map(|user| {
            let (running, confirmed, withheld, pass) = (&running, &confirmed, &withheld, &pass);
            async move {
                // Asked again just before the copy: what changed since the first look counts too.
                if holding(&pass.reference, &user) {
                    let fresh = at_source(pass.conf, pass.source, &user).await?;
                    let mut r = running.lock().expect("mirror pass");
                    r.extend(fresh);
                    let a = assess(&pass.reference, &r, pass.max_percent);
                    drop(r);
                    let loses = a.losses.iter().any(|l| l.mailbox == user);
                    if !a.allowed() && loses {
                        let g = guard.lock().expect("replication guard");
                        if g.confirms(&a, &pass.source.addr, confirmation) {
                            *confirmed.lock().expect("mirror pass") = true;
                        } else {
                            withheld.lock().expect("mirror pass").insert(user.clone());
                            return Ok(());
                        }
                    }
                }
                backup(pass.conf, pass.source, &user).await
            }
        })
        .buffer_unordered(CONCURRENT)
        .collect()
        .await;
    for r in results {
        r?;
    }
    if withheld.lock().expect("mirror pass").is_empty() {
        return Ok(*confirmed.lock().expect("mirror pass"));
    }
    let a = assess(
        &pass.reference,
        &running.lock().expect("mirror pass"),
        pass.max_percent,
    );
    let admission = guard.lock().expect("replication guard").admit(
        &a,
        &pass.source.addr,
        pass.max_percent,
        confirmation,
    );
    match admission {
        Admission::Refused(r) => Err(Refused(r).into()),
        // The source changed back meanwhile: the withheld mailboxes go in the next pass.
        _ => bail!("mailboxes withheld during the pass are mirrored in the next one"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_across_sites_is_reached_only_over_verified_tls() {
        let plain = Remote {
            addr: "corp-lun-0.mail.svc.cluster.local:12345".into(),
            ca_file: None,
        };
        assert!(plain.options().is_empty());
        assert_eq!(
            plain.dsync_target(),
            "tcp:corp-lun-0.mail.svc.cluster.local:12345"
        );
        let tls = Remote {
            addr: "[2001:db8::7]:12346".into(),
            ca_file: Some("/etc/mailpod/site-tls/ca.crt".into()),
        };
        assert_eq!(tls.dsync_target(), "tcps:[2001:db8::7]:12346");
        assert_eq!(
            tls.options(),
            [
                "-o",
                "doveadm_ssl=ssl",
                "-o",
                "doveadm_port=12346",
                "-o",
                "ssl_client_ca_file=/etc/mailpod/site-tls/ca.crt",
                "-o",
                "ssl_client_require_valid_cert=yes"
            ]
        );
        assert_eq!(tls.to_string(), "[2001:db8::7]:12346");
    }

    #[test]
    fn doveadm_status_json() {
        let mut out = Mailboxes::new();
        parse_status(
            br#"[{"username":"a@example.com","mailbox":"INBOX","messages":"3","uidvalidity":"1796195963"},{"username":"b@example.com","mailbox":"Archive","messages":"0","uidvalidity":"1796195964"}]"#,
            None,
            &mut out,
        )
        .unwrap();
        parse_status(
            br#"[{"mailbox":"INBOX","messages":"7","uidvalidity":"9"}]"#,
            Some("c@example.com"),
            &mut out,
        )
        .unwrap();
        assert_eq!(
            out["a@example.com"]["INBOX"],
            Folder {
                messages: 3,
                uidvalidity: 1796195963
            }
        );
        assert_eq!(out["b@example.com"]["Archive"].messages, 0);
        assert_eq!(out["c@example.com"]["INBOX"].messages, 7);
        assert!(parse_status(
            br#"[{"mailbox":"INBOX","messages":"7","uidvalidity":"9"}]"#,
            None,
            &mut out
        )
        .is_err());
        assert!(parse_status(b"", None, &mut out).is_err());
    }
}
