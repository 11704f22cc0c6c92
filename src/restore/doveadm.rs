//! The doveadm commands a restore runs: against the snapshot through a local, auth-only Dovecot, or
//! against the live store through its doveadm TCP service (`-S host:port`, and dsync to
//! `tcp:host:port`, authenticated with the `doveadm_password` of the local configuration).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Where a command runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Side {
    /// The snapshot mounted in the restore Job.
    Snapshot,
    /// The live store's doveadm service, `host:port`.
    Live(String),
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Side::Snapshot => f.write_str("the snapshot"),
            Side::Live(target) => write!(f, "the live store ({target})"),
        }
    }
}

/// One message as doveadm lists it: enough to tell whether the other side holds the same message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub folder: String,
    pub uid: u32,
    pub flags: Vec<String>,
    pub key: MessageKey,
}

/// What makes two copies "the same message": the same header block and size. A message restored from
/// the snapshot into the live store keeps both byte for byte (dsync and move copy it as it is; its UID
/// changes), so a second restore recognises what the first one brought back. The Message-ID alone would not do: mail delivered
/// straight over LMTP, drafts and some automated mail carry none.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageKey {
    pub message_id: String,
    pub size: u64,
    /// Hash of the whole header block; compared only within one run, so std's hasher will do.
    pub header_hash: u64,
}

/// Fields fetched for [`Listed`].
const LIST_FIELDS: &str = "mailbox uid flags hdr.message-id size.virtual hdr";

/// doveadm with one configuration file (the restore's local Dovecot).
#[derive(Clone, Debug)]
pub struct Doveadm {
    pub config: PathBuf,
    /// Global `-o` settings before every command: how a live store across sites is reached over TLS
    /// (agent::replication_mirror::Remote::options).
    pub options: Vec<String>,
}

impl Doveadm {
    /// doveadm with `config` and no other settings.
    pub fn new(config: PathBuf) -> Self {
        Self {
            config,
            options: vec![],
        }
    }

    fn command(&self, side: &Side, args: &[&str]) -> Command {
        let mut cmd = Command::new("doveadm");
        cmd.arg("-c").arg(&self.config);
        cmd.args(&self.options);
        // Global options (`-f` formatter, `-o` setting) come before the command name, `-S` after it.
        let mut globals = 0;
        while matches!(args.get(globals), Some(&"-f" | &"-o")) && globals + 1 < args.len() {
            globals += 2;
        }
        let (head, rest) = args.split_at(globals);
        cmd.args(head);
        let (name, rest) = match rest.first().copied() {
            // Two-word command names.
            Some("mailbox" | "flags") if rest.len() >= 2 => rest.split_at(2),
            _ => rest.split_at(1.min(rest.len())),
        };
        cmd.args(name);
        if let Side::Live(target) = side {
            cmd.args(["-S", target]);
        }
        cmd.args(rest);
        cmd
    }

    /// Runs a command and returns its stdout.
    fn run(&self, side: &Side, args: &[&str]) -> Result<Vec<u8>> {
        let mut cmd = self.command(side, args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("doveadm {} on {side}", args.join(" "));
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {what} (is Dovecot installed?)"))?;
        let out = child
            .wait_with_output()
            .with_context(|| format!("waiting for {what}"))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
            bail!(
                "{what} exited with {}: {}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            );
        }
        Ok(out.stdout)
    }

    /// The folders of `user` that hold mail. `mailbox status` rather than `mailbox list`: the list also
    /// names hierarchy parents that are not mailboxes (`Archive` of `Archive.2023`), which a restore must
    /// not turn into real folders.
    pub fn folders(&self, side: &Side, user: &str) -> Result<Vec<String>> {
        let out = self.run(
            side,
            &[
                "-f", "json", "mailbox", "status", "-u", user, "messages", "*",
            ],
        )?;
        let rows = parse_json(&out).with_context(|| format!("folders of {user} on {side}"))?;
        Ok(rows
            .into_iter()
            .filter_map(|mut r| r.remove("mailbox"))
            .collect())
    }

    pub fn create_folder(&self, side: &Side, user: &str, folder: &str) -> Result<()> {
        self.run(side, &["mailbox", "create", "-u", user, folder])
            .map(drop)
    }

    /// The messages of `user` matching a doveadm search `query`.
    pub fn list(&self, side: &Side, user: &str, query: &[&str]) -> Result<Vec<Listed>> {
        let mut args = vec!["-f", "json", "fetch", "-u", user, LIST_FIELDS];
        args.extend_from_slice(query);
        let out = self.run(side, &args)?;
        let rows = parse_json(&out).with_context(|| format!("messages of {user} on {side}"))?;
        rows.into_iter()
            .map(|r| listed(&r).with_context(|| format!("a message of {user} on {side}")))
            .collect()
    }

    /// `messages` and `uidnext` of `folder`: they change whenever a message is added or removed.
    pub fn counts(&self, side: &Side, user: &str, folder: &str) -> Result<(u64, u64)> {
        let out = self.run(
            side,
            &[
                "-f",
                "json",
                "mailbox",
                "status",
                "-u",
                user,
                "messages uidnext",
                folder,
            ],
        )?;
        let rows = parse_json(&out)?;
        let get = |k: &str| {
            rows.first()
                .and_then(|r| r.get(k))
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{k} of {folder} of {user} on {side}"))
        };
        Ok((get("messages")?, get("uidnext")?))
    }

    /// `uid` and `guid` of every message of `folder`.
    pub fn guids(&self, side: &Side, user: &str, folder: &str) -> Result<Vec<(u32, String)>> {
        let out = self.run(
            side,
            &[
                "-f", "json", "fetch", "-u", user, "uid guid", "mailbox", folder, "all",
            ],
        )?;
        let rows = parse_json(&out).with_context(|| format!("{folder} of {user} on {side}"))?;
        rows.into_iter()
            .map(|r| {
                let uid = r.get("uid").and_then(|u| u.parse().ok());
                match (uid, r.get("guid")) {
                    (Some(uid), Some(guid)) => Ok((uid, guid.clone())),
                    _ => bail!("doveadm gave no uid or guid for a message of {user} in {folder}"),
                }
            })
            .collect()
    }

    /// Moves every message of `from` into `to` (both folders of `user` on `side`). Inside one store
    /// a move keeps the received date, the flags and the GUID.
    pub fn move_all(&self, side: &Side, user: &str, from: &str, to: &str) -> Result<()> {
        self.run(side, &["move", "-u", user, to, "mailbox", from, "all"])
            .map(drop)
    }

    /// Expunges the messages `uids` of `folder`.
    pub fn expunge(&self, side: &Side, user: &str, folder: &str, uids: &[u32]) -> Result<()> {
        let set = uid_set(uids);
        self.run(
            side,
            &["expunge", "-u", user, "mailbox", folder, "uid", &set],
        )
        .map(drop)
    }

    /// Deletes `folder`, which must be empty.
    pub fn delete_folder(&self, side: &Side, user: &str, folder: &str) -> Result<()> {
        self.run(side, &["mailbox", "delete", "-u", user, folder])
            .map(drop)
    }

    /// Copies the messages `uids` of `folder` of the Maildir at `source` (read with in-memory indexes)
    /// into `<parent>.<folder>` of the scratch Maildir `scratch`, as `user`. `doveadm import` keeps each
    /// message's received date, flags, keywords and GUID.
    pub fn import_to_scratch(
        &self,
        scratch: &Path,
        user: &str,
        source: &Path,
        folder: &str,
        parent: &str,
        uids: &[u32],
    ) -> Result<()> {
        let scratch = scratch_location(scratch);
        let source = format!("maildir:{}:INDEX=MEMORY", source.display());
        let set = uid_set(uids);
        self.run(
            &Side::Snapshot,
            &[
                "-o", &scratch, "import", "-u", user, &source, parent, "mailbox", folder, "uid",
                &set,
            ],
        )
        .map(drop)
    }

    /// dsync of one folder of the scratch Maildir into the live store (`sync -1 -m`): a folder the live
    /// store lacks is created there with the messages' received dates, flags, keywords and GUIDs. Only
    /// the last `-m` counts in Dovecot 2.3, hence one folder per run.
    pub fn sync_to_live(
        &self,
        scratch: &Path,
        user: &str,
        folder: &str,
        live: &Side,
    ) -> Result<()> {
        let Side::Live(target) = live else {
            bail!("a scratch folder is synced to the live store only");
        };
        let scratch = scratch_location(scratch);
        // Across sites the live store answers only over TLS, verified as `options` say
        // (agent::replication_mirror::Remote): dsync then needs `tcps:`.
        let scheme = if self.options.iter().any(|o| o == "doveadm_ssl=ssl") {
            "tcps"
        } else {
            "tcp"
        };
        let destination = format!("{scheme}:{target}");
        self.run(
            &Side::Snapshot,
            &[
                "-o",
                &scratch,
                "sync",
                "-1",
                "-u",
                user,
                "-m",
                folder,
                &destination,
            ],
        )
        .map(drop)
    }
}

/// The `mail_location` override that points doveadm at a scratch Maildir.
fn scratch_location(maildir: &Path) -> String {
    format!("mail_location=maildir:{}", maildir.display())
}

/// `1:3,7,9:10`: a doveadm UID set, ranges collapsed so that thousands of UIDs stay a short argument.
pub fn uid_set(uids: &[u32]) -> String {
    let mut sorted = uids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts: Vec<String> = vec![];
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        while i + 1 < sorted.len() && sorted[i + 1] == sorted[i] + 1 {
            i += 1;
        }
        parts.push(if sorted[i] == start {
            start.to_string()
        } else {
            format!("{start}:{}", sorted[i])
        });
        i += 1;
    }
    parts.join(",")
}

/// doveadm's JSON formatter: an array of objects with string values (empty output: no rows).
fn parse_json(out: &[u8]) -> Result<Vec<BTreeMap<String, String>>> {
    if out.iter().all(u8::is_ascii_whitespace) {
        return Ok(vec![]);
    }
    serde_json::from_slice(out).context("parsing doveadm's JSON output")
}

fn listed(row: &BTreeMap<String, String>) -> Result<Listed> {
    let field = |name: &str| {
        row.get(name)
            .with_context(|| format!("doveadm gave no `{name}`"))
    };
    Ok(Listed {
        folder: field("mailbox")?.clone(),
        uid: field("uid")?.parse().context("uid")?,
        // \Recent belongs to the session that first sees a message; it cannot be set.
        flags: field("flags")?
            .split_whitespace()
            .filter(|f| *f != "\\Recent")
            .map(str::to_string)
            .collect(),
        key: MessageKey {
            message_id: field("hdr.message-id")?.trim().to_string(),
            size: field("size.virtual")?.parse().context("size.virtual")?,
            header_hash: {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                field("hdr")?.hash(&mut h);
                h.finish()
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(side: Side, args: &[&str]) -> Vec<String> {
        let d = Doveadm::new("/w/dovecot.conf".into());
        d.command(&side, args)
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn remote_socket_goes_after_the_command_name() {
        let live = || Side::Live("corp-lun-0:12345".into());
        assert_eq!(
            argv(
                live(),
                &["-f", "json", "mailbox", "status", "-u", "a@b", "messages", "*"]
            ),
            [
                "-c",
                "/w/dovecot.conf",
                "-f",
                "json",
                "mailbox",
                "status",
                "-S",
                "corp-lun-0:12345",
                "-u",
                "a@b",
                "messages",
                "*"
            ]
        );
        assert_eq!(
            argv(
                live(),
                &[
                    "move",
                    "-u",
                    "a@b",
                    "INBOX",
                    "mailbox",
                    "Restore-in-progress.INBOX",
                    "all"
                ]
            ),
            [
                "-c",
                "/w/dovecot.conf",
                "move",
                "-S",
                "corp-lun-0:12345",
                "-u",
                "a@b",
                "INBOX",
                "mailbox",
                "Restore-in-progress.INBOX",
                "all"
            ]
        );
        assert_eq!(
            argv(
                Side::Snapshot,
                &["-o", "mail_location=maildir:/s", "sync", "-1", "-u", "a@b"]
            ),
            [
                "-c",
                "/w/dovecot.conf",
                "-o",
                "mail_location=maildir:/s",
                "sync",
                "-1",
                "-u",
                "a@b"
            ]
        );
        assert_eq!(
            argv(Side::Snapshot, &["-f", "json", "fetch", "-u", "a@b", "uid"]),
            [
                "-c",
                "/w/dovecot.conf",
                "-f",
                "json",
                "fetch",
                "-u",
                "a@b",
                "uid"
            ]
        );
    }

    #[test]
    fn uid_sets_collapse_ranges() {
        assert_eq!(uid_set(&[7, 1, 2, 3, 9, 10, 3]), "1:3,7,9:10");
        assert_eq!(uid_set(&[5]), "5");
        assert_eq!(uid_set(&[]), "");
    }

    #[test]
    fn parses_listed_messages_without_recent() {
        let out = br#"[{"mailbox":"Projects","uid":"7","flags":"\\Seen \\Recent $Label1","hdr.message-id":" <p1@x> ","size.virtual":"64","hdr":"Message-ID: <p1@x>\n\n"},{"mailbox":"Projects","uid":"8","flags":"","hdr.message-id":"","size.virtual":"64","hdr":"Subject: x\n\n"}]"#;
        let rows = parse_json(out).unwrap();
        let l = listed(&rows[0]).unwrap();
        assert_eq!(l.folder, "Projects");
        assert_eq!(l.uid, 7);
        assert_eq!(l.flags, ["\\Seen", "$Label1"]);
        assert_eq!(l.key.message_id, "<p1@x>");
        assert_eq!(l.key.size, 64);
        let other = listed(&rows[1]).unwrap();
        assert!(other.flags.is_empty());
        assert_ne!(l.key, other.key, "same size, different headers");
        assert!(parse_json(b"\n").unwrap().is_empty());
        assert!(listed(&BTreeMap::new())
            .unwrap_err()
            .to_string()
            .contains("`mailbox`"));
    }
}
