//! What a store replica's role allows, enforced by the agent itself so that safety never waits on the
//! operator or on kube-proxy: only the LUN's active takes writes.
//!
//! - LMTP: the gate ([`super::lmtp_gate`]) accepts a transaction only while this replica holds the grant
//!   (its labels file says `active`). A standby, an unassigned replica and a demoted one answer
//!   `421 4.3.2` to new sessions and to the next `MAIL FROM` of an open one (Postfix caches LMTP
//!   connections for minutes), so the mail waits in the sender's queue and goes to the new active.
//! - IMAP and POP3: while not active, the private users file Dovecot's auth reads (agent::passwd) is
//!   empty, so every login is refused; Dovecot re-reads it by its modification time, so no reload is
//!   needed (a reload would also drop Dovecot's LMTP listener for a moment). On leaving active every
//!   session is kicked (`doveadm kick`): IDLE, APPEND to Sent or MOVE on a proxied session cannot reach a
//!   demoted store.
//!
//! Stores that do not replicate (no LUN named) are always granted.

use std::path::Path;

use anyhow::{Context, Result};

use crate::mailconfig::layout::Layout;

/// Whether logins are refused on this store (it is not its LUN's active).
pub fn logins_refused(layout: &Layout) -> bool {
    layout.logins_refused_marker().exists()
}

/// Allows or refuses logins: sets the marker and rewrites the private users file accordingly.
pub fn set_logins(layout: &Layout, allowed: bool) -> Result<()> {
    let marker = layout.logins_refused_marker();
    if allowed {
        match std::fs::remove_file(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", marker.display())),
        }
    } else {
        std::fs::create_dir_all(&layout.dovecot_config)
            .with_context(|| format!("creating {}", layout.dovecot_config.display()))?;
        std::fs::write(&marker, "this replica is not its LUN's active\n")
            .with_context(|| format!("writing {}", marker.display()))?;
    }
    super::render::install_users(layout)?;
    Ok(())
}

/// Ends every IMAP and POP3 session of this store. Sessions are picked by client address (every address),
/// from anvil's list of connections: a user mask would make doveadm iterate users, which the static userdb
/// cannot do.
pub async fn kick_all_sessions(dovecot_conf: &Path) -> Result<()> {
    for network in ["0.0.0.0/0", "::/0"] {
        let out = tokio::process::Command::new("doveadm")
            .arg("-c")
            .arg(dovecot_conf)
            .args(["kick", network])
            .output()
            .await
            .context("running doveadm kick")?;
        // doveadm kick exits non-zero when nobody was connected; only a failure to talk to Dovecot matters.
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && stderr.contains("Error") {
            anyhow::bail!("doveadm kick {network}: {}", stderr.trim());
        }
    }
    Ok(())
}
