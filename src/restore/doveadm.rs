//! The doveadm commands a restore runs: against the snapshot through a local, auth-only Dovecot, or
//! against the live store through its doveadm TCP service (`-S host:port`, authenticated with the
//! `doveadm_password` of the local configuration).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
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

/// What makes two copies "the same message": the same header block and size. A message saved from the
/// snapshot into the live store keeps both byte for byte (its UID and GUID change), so a second restore
/// recognises what the first one brought back. The Message-ID alone would not do: mail delivered
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
        // Formatter options come before the command name, `-S` after it.
        let (head, rest) = args.split_at(usize::from(args.first() == Some(&"-f")) * 2);
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

    /// Runs a command and returns its stdout; `input` is piped to stdin.
    fn run(&self, side: &Side, args: &[&str], input: Option<&[u8]>) -> Result<Vec<u8>> {
        let mut cmd = self.command(side, args);
        cmd.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let what = format!("doveadm {} on {side}", args.join(" "));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {what} (is Dovecot installed?)"))?;
        if let Some(bytes) = input {
            let mut stdin = child.stdin.take().expect("piped stdin");
            stdin
                .write_all(bytes)
                .with_context(|| format!("{what}: writing the message"))?;
        }
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
            None,
        )?;
        let rows = parse_json(&out).with_context(|| format!("folders of {user} on {side}"))?;
        Ok(rows
            .into_iter()
            .filter_map(|mut r| r.remove("mailbox"))
            .collect())
    }

    pub fn create_folder(&self, side: &Side, user: &str, folder: &str) -> Result<()> {
        self.run(side, &["mailbox", "create", "-u", user, folder], None)
            .map(drop)
    }

    /// The messages of `user` matching a doveadm search `query`.
    pub fn list(&self, side: &Side, user: &str, query: &[&str]) -> Result<Vec<Listed>> {
        let mut args = vec!["-f", "json", "fetch", "-u", user, LIST_FIELDS];
        args.extend_from_slice(query);
        let out = self.run(side, &args, None)?;
        let rows = parse_json(&out).with_context(|| format!("messages of {user} on {side}"))?;
        rows.into_iter()
            .map(|r| listed(&r).with_context(|| format!("a message of {user} on {side}")))
            .collect()
    }

    /// The message exactly as stored (`fetch text`, pager format: `text:` then the raw message).
    pub fn message(&self, side: &Side, user: &str, folder: &str, uid: u32) -> Result<Vec<u8>> {
        let uid = uid.to_string();
        let out = self.run(
            side,
            &[
                "-f", "pager", "fetch", "-u", user, "text", "mailbox", folder, "uid", &uid,
            ],
            None,
        )?;
        match out.strip_prefix(b"text:\n") {
            Some(raw) if !raw.is_empty() => Ok(raw.to_vec()),
            _ => bail!("message uid {uid} of {user} in {folder} on {side} is gone or empty"),
        }
    }

    /// Several messages of `folder` in one doveadm run, by UID; those gone meanwhile are left out.
    /// The pager format prints `uid: N`, `size.physical: S`, `text:` and then exactly S bytes (what
    /// Maildir stores), records separated by a form feed line; the size, not the form feed, delimits the
    /// message, so a form feed inside a message cannot cut it. An answer that does not parse this way
    /// is an error (the caller falls back to [`Doveadm::message`]).
    pub fn messages(
        &self,
        side: &Side,
        user: &str,
        folder: &str,
        uids: &[u32],
    ) -> Result<BTreeMap<u32, Vec<u8>>> {
        let set = uids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let out = self.run(
            side,
            &[
                "-f",
                "pager",
                "fetch",
                "-u",
                user,
                "uid size.physical text",
                "mailbox",
                folder,
                "uid",
                &set,
            ],
            None,
        )?;
        parse_pager_messages(&out)
            .with_context(|| format!("messages of {user} in {folder} on {side}"))
    }

    /// Appends a message to `folder` (which must exist).
    pub fn save(&self, side: &Side, user: &str, folder: &str, message: &[u8]) -> Result<()> {
        self.run(side, &["save", "-u", user, "-m", folder], Some(message))
            .map(drop)
    }

    /// The next UID `folder` will assign.
    pub fn uid_next(&self, side: &Side, user: &str, folder: &str) -> Result<u32> {
        let out = self.run(
            side,
            &[
                "-f", "json", "mailbox", "status", "-u", user, "uidnext", folder,
            ],
            None,
        )?;
        parse_json(&out)?
            .first()
            .and_then(|r| r.get("uidnext"))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("uidnext of {folder} of {user} on {side}"))
    }

    /// Sets `flags` on the messages `uids` of `folder`.
    pub fn add_flags(
        &self,
        side: &Side,
        user: &str,
        folder: &str,
        flags: &[String],
        uids: &[u32],
    ) -> Result<()> {
        let flags = flags.join(" ");
        let uids = uids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        self.run(
            side,
            &[
                "flags", "add", "-u", user, &flags, "mailbox", folder, "uid", &uids,
            ],
            None,
        )
        .map(drop)
    }
}

/// doveadm's JSON formatter: an array of objects with string values (empty output: no rows).
fn parse_json(out: &[u8]) -> Result<Vec<BTreeMap<String, String>>> {
    if out.iter().all(u8::is_ascii_whitespace) {
        return Ok(vec![]);
    }
    serde_json::from_slice(out).context("parsing doveadm's JSON output")
}

fn parse_pager_messages(mut out: &[u8]) -> Result<BTreeMap<u32, Vec<u8>>> {
    fn field<'a>(out: &mut &'a [u8], name: &str) -> Result<&'a str> {
        let prefix = format!("{name}:");
        let end = out
            .iter()
            .position(|b| *b == b'\n')
            .with_context(|| format!("no line `{name}:`"))?;
        let line = std::str::from_utf8(&out[..end]).context("not text")?;
        let value = line
            .strip_prefix(&prefix)
            .with_context(|| format!("expected `{name}:`, found {line:?}"))?;
        *out = &out[end + 1..];
        Ok(value.trim())
    }
    let mut messages = BTreeMap::new();
    while !out.is_empty() {
        let uid: u32 = field(&mut out, "uid")?.parse().context("uid")?;
        let size: usize = field(&mut out, "size.physical")?
            .parse()
            .context("size.physical")?;
        field(&mut out, "text")?;
        if out.len() < size {
            bail!("message uid {uid} is shorter than its size {size}");
        }
        let (text, rest) = out.split_at(size);
        out = match rest {
            [] => rest,
            [b'\x0c', b'\n', more @ ..] => more,
            _ => bail!("message uid {uid} does not end at its size {size}"),
        };
        messages.insert(uid, text.to_vec());
    }
    Ok(messages)
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
            argv(live(), &["save", "-u", "a@b", "-m", "INBOX"]),
            [
                "-c",
                "/w/dovecot.conf",
                "save",
                "-S",
                "corp-lun-0:12345",
                "-u",
                "a@b",
                "-m",
                "INBOX"
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
    fn pager_messages_are_cut_by_their_size() {
        let out = b"uid: 1\nsize.physical: 13\ntext:\nA: b\n\nx\x0c\nuid:\x0c\nuid: 3\nsize.physical: 5\ntext:\nno nl";
        let m = parse_pager_messages(out).unwrap();
        assert_eq!(m[&1], b"A: b\n\nx\x0c\nuid:");
        assert_eq!(m[&3], b"no nl");
        assert!(parse_pager_messages(b"").unwrap().is_empty());
        let err = parse_pager_messages(b"uid: 1\nsize.physical: 3\ntext:\nabcd").unwrap_err();
        assert!(
            err.to_string().contains("does not end at its size"),
            "{err}"
        );
        assert!(parse_pager_messages(b"uid: 1\nsize.physical: 9\ntext:\nab").is_err());
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
