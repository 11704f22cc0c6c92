//! restic (Debian's `restic`) against an S3-compatible bucket: an encrypted repository per LUN, one restic
//! snapshot per VolumeSnapshot backed up, retention by count and age, and restore of one mailbox or the
//! whole mail root.
//!
//! Every run passes the repository, the password file and the cache explicitly, so nothing depends on
//! restic's environment defaults; S3 credentials come as environment variables (restic reads
//! `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`). Backups are taken from inside the mail root (`.`), so
//! paths in the repository are `/<domain>/<user>/Maildir/...` whatever the mount point was.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};
use jiff::Timestamp;
use serde::Deserialize;

/// What restic says when the repository has no config yet (restic 0.14: exit status 1 and this text).
const NO_REPOSITORY: &[&str] = &[
    "Is there a repository at the following location?",
    "unable to open config file",
];

/// One restic repository.
#[derive(Clone, Debug)]
pub struct Repository {
    /// `s3:<endpoint>/<bucket>/<prefix>`, e.g. `s3:https://s3.example.com/mail-backups/corp-lun-0`.
    pub url: String,
    /// File holding the repository password (from a Secret); the repository is encrypted with it.
    pub password_file: PathBuf,
    /// Environment for the backend: S3 credentials and region.
    pub env: Vec<(String, String)>,
    /// restic's cache; `None` runs without one (`--no-cache`).
    pub cache_dir: Option<PathBuf>,
}

/// How many backups to keep: the newest `keep_last`, and every one newer than `keep_within` before the
/// newest backup (restic's `--keep-within`, relative to the newest, so stopped backups never empty the
/// repository).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    pub keep_last: u32,
    /// A restic duration (`30d`, `1y6m`), or none.
    pub keep_within: Option<String>,
}

/// A backup in the repository (`restic snapshots --json`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Backup {
    pub id: String,
    pub short_id: String,
    pub time: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
}

impl Backup {
    pub fn tags(&self) -> &[String] {
        self.tags.as_deref().unwrap_or_default()
    }
}

#[derive(Deserialize)]
struct Summary {
    message_type: String,
    #[serde(default)]
    snapshot_id: Option<String>,
}

#[derive(Deserialize)]
struct ForgetGroup {
    #[serde(default)]
    remove: Option<Vec<Backup>>,
}

impl Repository {
    fn command(&self) -> Command {
        let mut cmd = Command::new("restic");
        cmd.arg("--repo")
            .arg(&self.url)
            .arg("--password-file")
            .arg(&self.password_file);
        match &self.cache_dir {
            Some(dir) => cmd.arg("--cache-dir").arg(dir),
            None => cmd.arg("--no-cache"),
        };
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn run(&self, what: &str, cmd: &mut Command) -> Result<Output> {
        let out = cmd
            .output()
            .with_context(|| format!("running restic {what} (is restic installed?)"))?;
        if !out.status.success() {
            bail!(
                "restic {what} on {} failed ({}): {}",
                self.url,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// Creates the repository unless it exists; `true` when it was created. A wrong password or an
    /// unreachable bucket is an error, never a reason to initialise.
    pub fn init_if_missing(&self) -> Result<bool> {
        let probe = self
            .command()
            .args(["cat", "config"])
            .output()
            .context("running restic cat config (is restic installed?)")?;
        if probe.status.success() {
            return Ok(false);
        }
        let err = String::from_utf8_lossy(&probe.stderr);
        if !NO_REPOSITORY.iter().any(|m| err.contains(m)) {
            bail!("restic repository {}: {}", self.url, err.trim());
        }
        self.run("init", self.command().arg("init"))?;
        Ok(true)
    }

    /// Backs up the tree under `mail_root` as one restic snapshot of `host`, tagged; `time` overrides the
    /// snapshot's time (the VolumeSnapshot's creation). Returns the snapshot's id.
    pub fn backup(
        &self,
        mail_root: &Path,
        host: &str,
        tags: &[String],
        time: Option<Timestamp>,
    ) -> Result<String> {
        let mut cmd = self.command();
        cmd.current_dir(mail_root)
            .args(["backup", "--json", "--quiet", "--host", host]);
        for t in tags {
            cmd.arg("--tag").arg(t);
        }
        if let Some(t) = time {
            // restic reads --time in the local time zone.
            let local = t.to_zoned(jiff::tz::TimeZone::system());
            cmd.arg("--time")
                .arg(local.strftime("%Y-%m-%d %H:%M:%S").to_string());
        }
        cmd.arg(".");
        let out = self.run("backup", &mut cmd)?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Summary>(l).ok())
            .find(|s| s.message_type == "summary")
            .and_then(|s| s.snapshot_id)
            .context("restic backup printed no summary with a snapshot id")
    }

    /// The backups of `host`, oldest first.
    pub fn backups(&self, host: &str) -> Result<Vec<Backup>> {
        let out = self.run(
            "snapshots",
            self.command().args(["snapshots", "--json", "--host", host]),
        )?;
        serde_json::from_slice(&out.stdout).context("reading restic snapshots --json")
    }

    /// Forgets the backups of `host` that `retention` does not keep and prunes their data; returns the
    /// ids removed.
    pub fn forget(&self, host: &str, retention: &Retention) -> Result<Vec<String>> {
        let mut cmd = self.command();
        cmd.args([
            "forget",
            "--json",
            "--prune",
            "--host",
            host,
            "--group-by",
            "host",
        ])
        .arg("--keep-last")
        .arg(retention.keep_last.max(1).to_string());
        if let Some(within) = &retention.keep_within {
            cmd.arg("--keep-within").arg(within);
        }
        let out = self.run("forget", &mut cmd)?;
        // `--json` prints the groups on the first line; prune's progress follows.
        let first = out.stdout.split(|b| *b == b'\n').next().unwrap_or_default();
        let groups: Vec<ForgetGroup> =
            serde_json::from_slice(first).context("reading restic forget --json")?;
        Ok(groups
            .into_iter()
            .flat_map(|g| g.remove.unwrap_or_default())
            .map(|b| b.id)
            .collect())
    }

    /// Restores backup `id` under `target`: one mailbox (`Some(address)`) or everything.
    pub fn restore(&self, id: &str, target: &Path, mailbox: Option<&str>) -> Result<()> {
        let mut cmd = self.command();
        cmd.args(["restore", id, "--target"]).arg(target);
        if let Some(address) = mailbox {
            cmd.arg("--include").arg(mailbox_path(address)?);
        }
        self.run("restore", &mut cmd)?;
        Ok(())
    }
}

/// Where a mailbox lives in a backup (the store's `<domain>/<user>` under the mail root).
pub fn mailbox_path(address: &str) -> Result<String> {
    match crate::crd::split_address(address) {
        Some((user, domain)) => Ok(format!("/{domain}/{user}")),
        None => bail!("`{address}` is not a mail address"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_paths() {
        assert_eq!(
            mailbox_path("alice@example.com").unwrap(),
            "/example.com/alice"
        );
        assert!(mailbox_path("../etc").is_err());
    }
}
