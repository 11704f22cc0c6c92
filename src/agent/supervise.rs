//! Starting, supervising, reloading and stopping Postfix and Dovecot.
//!
//! Each daemon runs in the foreground as a child of the agent (`postfix start-fg`, `dovecot -F`). A daemon
//! that exits on its own is restarted with exponential backoff; one that keeps failing makes the agent exit
//! so the kubelet restarts the pod and reports it. On shutdown each daemon is asked to stop
//! (`postfix stop`, `doveadm stop`), and killed only if it outlasts the grace period.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::mailconfig::layout::Layout;

/// Restarts allowed within [`FAILURE_WINDOW`] before the agent gives up.
const MAX_FAILURES: usize = 5;
const FAILURE_WINDOW: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Daemon {
    Postfix,
    Dovecot,
}

impl Daemon {
    pub fn name(self) -> &'static str {
        match self {
            Daemon::Postfix => "postfix",
            Daemon::Dovecot => "dovecot",
        }
    }

    fn command(self, layout: &Layout) -> Command {
        let mut c = match self {
            Daemon::Postfix => {
                let mut c = Command::new("postfix");
                c.arg("-c").arg(&layout.postfix_config).arg("start-fg");
                c
            }
            Daemon::Dovecot => {
                let mut c = Command::new("dovecot");
                c.arg("-F").arg("-c").arg(layout.dovecot_conf());
                c
            }
        };
        c.stdin(Stdio::null());
        c
    }

    /// Directories the daemon needs, with the owners it expects.
    pub fn prepare(self, layout: &Layout) -> Result<()> {
        mkdir(&layout.log_dir)?;
        match self {
            Daemon::Postfix => {
                mkdir(&layout.postfix_queue)?;
                mkdir(&layout.postfix_data)?;
                let (uid, gid) = system_user("postfix")?;
                std::os::unix::fs::chown(&layout.postfix_data, Some(uid), Some(gid)).with_context(
                    || format!("chown {} to postfix", layout.postfix_data.display()),
                )?;
            }
            Daemon::Dovecot => {
                mkdir(&layout.dovecot_base)?;
                mkdir(&layout.dovecot_state)?;
                mkdir(&layout.mail_root)?;
                std::os::unix::fs::chown(
                    &layout.mail_root,
                    Some(layout.mail_uid),
                    Some(layout.mail_gid),
                )
                .with_context(|| {
                    format!("chown {} to the mail user", layout.mail_root.display())
                })?;
            }
        }
        Ok(())
    }

    /// Applies a configuration change to the running daemon without restarting it.
    pub async fn reload(self, layout: &Layout) -> Result<()> {
        match self {
            Daemon::Postfix => {
                control(
                    "postfix",
                    &[&layout.postfix_config.display().to_string(), "reload"],
                )
                .await
            }
            Daemon::Dovecot => {
                control(
                    "doveadm",
                    &[&layout.dovecot_conf().display().to_string(), "reload"],
                )
                .await
            }
        }
    }

    async fn stop(self, layout: &Layout) -> Result<()> {
        match self {
            Daemon::Postfix => {
                control(
                    "postfix",
                    &[&layout.postfix_config.display().to_string(), "stop"],
                )
                .await
            }
            Daemon::Dovecot => {
                control(
                    "doveadm",
                    &[&layout.dovecot_conf().display().to_string(), "stop"],
                )
                .await
            }
        }
    }

    async fn abort(self, layout: &Layout) {
        if self == Daemon::Postfix {
            let _ = control(
                "postfix",
                &[&layout.postfix_config.display().to_string(), "abort"],
            )
            .await;
        }
    }
}

/// Runs `program -c CONFIG verb` and fails with its output when it fails.
async fn control(program: &str, args: &[&str]) -> Result<()> {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(program).arg("-c").args(args).output(),
    )
    .await
    .with_context(|| format!("{program} {} timed out", args.join(" ")))?
    .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(())
}

/// Keeps one daemon running until `shutdown` turns true, then stops it within `grace`.
pub async fn supervise(
    daemon: Daemon,
    layout: Layout,
    alive: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    on_restart: impl Fn(),
) -> Result<()> {
    let mut failures: Vec<Instant> = Vec::new();
    let mut backoff = Duration::from_millis(500);
    loop {
        daemon.prepare(&layout)?;
        let mut child: Child = daemon
            .command(&layout)
            .spawn()
            .with_context(|| format!("starting {} (is it installed?)", daemon.name()))?;
        alive.store(true, Ordering::SeqCst);
        tracing::info!(daemon = daemon.name(), pid = child.id(), "started");
        let started = Instant::now();
        tokio::select! {
            status = child.wait() => {
                alive.store(false, Ordering::SeqCst);
                if *shutdown.borrow() {
                    return Ok(());
                }
                let status = status.with_context(|| format!("waiting for {}", daemon.name()))?;
                tracing::error!(daemon = daemon.name(), %status, "exited unexpectedly");
                let now = Instant::now();
                failures.retain(|t| now.duration_since(*t) < FAILURE_WINDOW);
                failures.push(now);
                if failures.len() > MAX_FAILURES {
                    bail!("{} failed {} times within {:?}; giving up (see its log in {})",
                        daemon.name(), failures.len(), FAILURE_WINDOW, layout.log_dir.display());
                }
                if started.elapsed() > FAILURE_WINDOW {
                    backoff = Duration::from_millis(500);
                }
                on_restart();
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            _ = shutdown.changed() => {
                stop_child(daemon, &layout, &mut child, grace).await;
                alive.store(false, Ordering::SeqCst);
                return Ok(());
            }
        }
    }
}

async fn stop_child(daemon: Daemon, layout: &Layout, child: &mut Child, grace: Duration) {
    tracing::info!(daemon = daemon.name(), "stopping");
    // Reap the child while the stop command runs: `doveadm stop` waits until the master is gone, which a
    // zombie never is.
    let (stopped, exited) = tokio::join!(
        daemon.stop(layout),
        tokio::time::timeout(grace, child.wait())
    );
    if let Err(e) = stopped {
        tracing::warn!(daemon = daemon.name(), error = %e, "orderly stop failed");
    }
    if exited.is_err() {
        tracing::warn!(
            daemon = daemon.name(),
            "still running after the grace period: killing"
        );
        daemon.abort(layout).await;
        let _ = child.kill().await;
    }
    tracing::info!(daemon = daemon.name(), "stopped");
}

fn mkdir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}

/// uid and gid of a system user, from /etc/passwd.
pub fn system_user(name: &str) -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    parse_passwd(&passwd, name).with_context(|| {
        format!("user `{name}` not found in /etc/passwd (is the package installed?)")
    })
}

fn parse_passwd(passwd: &str, name: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lookup() {
        let p = "root:x:0:0:root:/root:/bin/bash\npostfix:x:102:105::/var/spool/postfix:/usr/sbin/nologin\n";
        assert_eq!(parse_passwd(p, "postfix"), Some((102, 105)));
        assert_eq!(parse_passwd(p, "vmail"), None);
    }
}
