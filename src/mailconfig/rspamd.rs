//! Inbound filtering of the `mx` role: the Postfix milter settings, and the configuration of rspamd (its
//! `local.d` files over Debian's stock /etc/rspamd), clamd and freshclam.
//!
//! rspamd and clamd run beside Postfix in each mx pod and answer on 127.0.0.1, so the filter fails and
//! scales with the mx it serves and no Service hop can stall a message; the greylisting and Bayes state is
//! in one Redis per MailPod, which every mx replica shares (a retry may reach another replica).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::settings::FilterSettings;
use crate::crd::FilteringSpec;

/// rspamd's milter in the mx pod.
pub const MILTER_PORT: u16 = 11332;
pub const MILTER_IN_POD: &str = "127.0.0.1:11332";
/// clamd in the mx pod.
pub const CLAMD_PORT: u16 = 3310;
/// The MailPod's Redis.
pub const REDIS_PORT: u16 = 6379;
/// Longest wait for a connection to the milter: a filter that is not there is known at once.
const MAX_CONNECT_SECONDS: u32 = 5;

/// Where the filter's parts answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// rspamd's milter, `host:port`.
    pub milter: String,
    /// Redis, `host:port`.
    pub redis: String,
    /// clamd, `host:port`.
    pub clamd: String,
}

impl Endpoints {
    /// In an mx pod: rspamd and clamd on loopback, Redis at `redis_host` (its Service).
    pub fn in_pod(redis_host: &str) -> Self {
        Self {
            milter: MILTER_IN_POD.into(),
            redis: format!("{redis_host}:{REDIS_PORT}"),
            clamd: format!("127.0.0.1:{CLAMD_PORT}"),
        }
    }
}

/// main.cf parameters of mx that put every message through the milter, with every wait bounded and the
/// answer while the milter is down stated.
pub fn milter_params(f: &FilterSettings) -> Vec<(&'static str, String)> {
    let t = f.timeout_seconds;
    vec![
        ("smtpd_milters", format!("inet:{}", f.milter)),
        // Bounces and other mail Postfix makes itself are not scanned.
        ("non_smtpd_milters", String::new()),
        ("milter_protocol", "6".into()),
        (
            "milter_default_action",
            if f.tempfail_when_down {
                "tempfail"
            } else {
                "accept"
            }
            .into(),
        ),
        (
            "milter_connect_timeout",
            format!("{}s", t.min(MAX_CONNECT_SECONDS)),
        ),
        ("milter_command_timeout", format!("{t}s")),
        ("milter_content_timeout", format!("{t}s")),
        (
            "milter_mail_macros",
            "i {mail_addr} {client_addr} {client_name} {auth_authen}".into(),
        ),
    ]
}

/// Seconds rspamd may spend on one message: less than Postfix waits, so a slow check (a DNS list that
/// does not answer) ends in a verdict rather than in Postfix's timeout.
pub fn task_timeout_seconds(spec: &FilteringSpec) -> u32 {
    spec.timeout_seconds.saturating_sub(2).max(3)
}

fn action(score: u32) -> String {
    if score == 0 {
        "null".into()
    } else {
        score.to_string()
    }
}

/// The files both rspamd roles share: console logging, and only the proxy worker, as Postfix's milter on
/// `milter` (it scans by itself; neither the normal worker nor the web controller runs).
fn milter_worker_files(milter: &str, timeout_seconds: u32) -> [(&'static str, String); 4] {
    [
        (
            "logging.inc",
            "type = \"console\";\nlevel = \"notice\";\nsystemd = false;\n".into(),
        ),
        (
            "worker-proxy.inc",
            format!(
                "bind_socket = \"{milter}\";\nmilter = yes;\ntimeout = {timeout_seconds}s;\nupstream \"local\" {{\n  default = yes;\n  self_scan = yes;\n}}\n"
            ),
        ),
        ("worker-normal.inc", "enabled = false;\n".into()),
        ("worker-controller.inc", "enabled = false;\n".into()),
    ]
}

/// rspamd's `override.d` files (name -> text), which Debian's /etc/rspamd/rspamd.conf reads over its
/// defaults when rspamd runs with `--var=LOCAL_CONFDIR=<dir>` and these in `<dir>/override.d` (not
/// `local.d`: that merges lists, so `local_addrs` would keep the private ranges).
pub fn rspamd_files(
    spec: &FilteringSpec,
    max_message_bytes: u64,
    ep: &Endpoints,
) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    let mut put = |name: &str, text: String| {
        files.insert(name.to_string(), text);
    };
    put(
        "options.inc",
        format!(
            "# Only the pod itself is local: a client on a private address (a node, a load balancer) is scanned\n\
             # like any. (An empty list would keep rspamd's default, the private ranges.)\n\
             local_addrs = [\"127.0.0.1/32\", \"::1/128\"];\n\
             task_timeout = {}s;\n\
             dns {{\n  timeout = 1s;\n  retransmits = 2;\n}}\n",
            task_timeout_seconds(spec)
        ),
    );
    for (name, text) in milter_worker_files(&ep.milter, spec.timeout_seconds) {
        put(name, text);
    }
    put(
        "redis.conf",
        format!("servers = \"{}\";\ntimeout = 1s;\n", ep.redis),
    );
    put(
        "actions.conf",
        format!(
            "reject = {};\nadd_header = {};\ngreylist = {};\n",
            action(spec.reject_score),
            action(spec.add_header_score),
            action(spec.greylist_score)
        ),
    );
    put(
        "greylist.conf",
        format!(
            "enabled = {};\ntimeout = 5min;\nexpire = 1d;\n",
            spec.greylist_score != 0
        ),
    );
    put(
        "milter_headers.conf",
        "use = [\"authentication-results\", \"x-spam-status\", \"x-virus\"];\nskip_local = false;\n".into(),
    );
    let mut av = String::new();
    if spec.scans_viruses() {
        let _ = write!(
            av,
            "clamav {{\n  type = \"clamav\";\n  servers = \"{}\";\n  symbol = \"CLAM_VIRUS\";\n  action = \"reject\";\n  \
             message = '${{SCANNER}}: virus found: \"${{VIRUS}}\"';\n  scan_mime_parts = true;\n  scan_text_mime = true;\n  \
             max_size = {max_message_bytes};\n  timeout = {}s;\n  retransmits = 1;\n  log_clean = false;\n}}\n",
            ep.clamd,
            task_timeout_seconds(spec).saturating_sub(1).max(2),
        );
    }
    put("antivirus.conf", av);
    files
}

/// Seconds submission waits for each answer of the signer: signing is local work (no DNS, no Redis).
pub const SIGNER_TIMEOUT_SECONDS: u32 = 30;

/// main.cf settings of submission's signer: rspamd in the pod, and a 451 while it does not answer (the
/// user's client keeps the message and retries: mail for a domain with a DMARC policy that leaves
/// unsigned is refused by receivers, so nothing leaves unsigned).
pub fn signer_settings() -> FilterSettings {
    FilterSettings {
        milter: MILTER_IN_POD.into(),
        timeout_seconds: SIGNER_TIMEOUT_SECONDS,
        tempfail_when_down: true,
    }
}

/// rspamd's `override.d` files for the DKIM signer of submission (`milter`: where it listens): signing
/// only, with the key of the From domain read from `key_dir/<domain>.<selector>.key` (rspamd's "fallback"
/// path and selector, so a key added for a new domain is used without a restart); it refuses and marks
/// nothing, and a domain without a key is sent unsigned (it is not one of the MailPod's).
///
/// Of rspamd's C modules only `dkim` (whose signing function `dkim_signing` calls) is loaded: the stock
/// `fuzzy_check` resolves its public servers while the configuration loads, and where cluster DNS cannot
/// reach the internet each name waits out its timeouts across the pod's search domains, delaying the
/// signer's start (and every submission pod's readiness) by minutes.
pub fn signer_files(selector: &str, key_dir: &str, milter: &str) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    let mut put = |name: &str, text: String| {
        files.insert(name.to_string(), text);
    };
    put(
        "options.inc",
        "filters = \"dkim\";\nlocal_addrs = [\"127.0.0.1/32\", \"::1/128\"];\ntask_timeout = 20s;\ndns {\n  timeout = 1s;\n  retransmits = 1;\n}\n"
            .into(),
    );
    for (name, text) in milter_worker_files(milter, SIGNER_TIMEOUT_SECONDS) {
        put(name, text);
    }
    // Outbound mail of authenticated users is not judged here.
    put(
        "actions.conf",
        "reject = null;\nadd_header = null;\ngreylist = null;\nrewrite_subject = null;\n".into(),
    );
    put("milter_headers.conf", "use = [];\n".into());
    put(
        "dkim_signing.conf",
        format!(
            "enabled = true;\npath = \"{key_dir}/$domain.$selector.key\";\nselector = \"{selector}\";\n\
             sign_authenticated = true;\nsign_local = false;\nsign_inbound = false;\nuse_domain = \"header\";\n\
             use_esld = false;\nallow_username_mismatch = true;\nallow_hdrfrom_mismatch = false;\n\
             try_fallback = true;\nuse_redis = false;\n"
        ),
    );
    files
}

/// clamd.conf: on `clamd` only (`host:port`), signatures in `database_dir`, in the foreground, reloading
/// signatures freshclam (or whoever fills the volume) replaces.
pub fn clamd_conf(max_message_bytes: u64, clamd: &str, database_dir: &str) -> String {
    let (host, port) = clamd.rsplit_once(':').unwrap_or((clamd, "3310"));
    // Mail is larger than its attachments; a part is never larger than the message.
    let limit = max_message_bytes + (1 << 20);
    format!(
        "Foreground yes\nTCPAddr {host}\nTCPSocket {port}\nDatabaseDirectory {database_dir}\nUser clamav\n\
         LogTime yes\nLogClean no\nStreamMaxLength {limit}\nMaxScanSize {limit}\nMaxFileSize {limit}\n\
         SelfCheck 600\nMaxThreads 4\n"
    )
}

/// freshclam.conf: signatures into `database_dir` from `mirror` (`database.clamav.net` by default),
/// checked every two hours, clamd told of each update through `clamd_conf_path`.
pub fn freshclam_conf(mirror: Option<&str>, database_dir: &str, clamd_conf_path: &str) -> String {
    let source = match mirror {
        Some(m) => format!("PrivateMirror {m}"),
        None => "DatabaseMirror database.clamav.net".into(),
    };
    format!(
        "Foreground yes\nDatabaseDirectory {database_dir}\nDatabaseOwner clamav\n{source}\nChecks 12\n\
         NotifyClamd {clamd_conf_path}\nLogTime yes\n\
         # Testing a download loads every signature (about 1 GiB) in freshclam too; clamd keeps its old\n\
         # signatures when a new set fails to load.\nTestDatabases no\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_milter_wait_is_bounded_and_the_down_policy_is_stated() {
        let p = milter_params(&FilterSettings {
            milter: "127.0.0.1:11332".into(),
            timeout_seconds: 30,
            tempfail_when_down: true,
        });
        let get = |k: &str| p.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("smtpd_milters"), Some("inet:127.0.0.1:11332"));
        assert_eq!(get("milter_default_action"), Some("tempfail"));
        assert_eq!(get("milter_connect_timeout"), Some("5s"));
        assert_eq!(get("milter_command_timeout"), Some("30s"));
        assert_eq!(get("milter_content_timeout"), Some("30s"));
        let accept = milter_params(&FilterSettings {
            milter: "127.0.0.1:1".into(),
            timeout_seconds: 5,
            tempfail_when_down: false,
        });
        assert!(accept.contains(&("milter_default_action", "accept".into())));
    }

    #[test]
    fn actions_follow_the_spec_and_zero_turns_one_off() {
        let spec: FilteringSpec =
            serde_yaml::from_str("rejectScore: 20\naddHeaderScore: 8\ngreylistScore: 0").unwrap();
        let files = rspamd_files(&spec, 1000, &Endpoints::in_pod("r.mail.svc.cluster.local"));
        assert_eq!(
            files["actions.conf"],
            "reject = 20;\nadd_header = 8;\ngreylist = null;\n"
        );
        assert!(files["greylist.conf"].starts_with("enabled = false;"));
        assert!(files["redis.conf"].contains("servers = \"r.mail.svc.cluster.local:6379\";"));
        assert!(files["antivirus.conf"].contains("servers = \"127.0.0.1:3310\";"));
        assert!(files["options.inc"].contains("task_timeout = 28s;"));
        let signer = signer_files("s1", "/keys", "127.0.0.1:11332");
        assert!(signer["dkim_signing.conf"].contains("path = \"/keys/$domain.$selector.key\";"));
        assert!(signer["dkim_signing.conf"].contains("selector = \"s1\";"));
        assert!(signer["actions.conf"].contains("reject = null;"));
        let no_av: FilteringSpec = serde_yaml::from_str("antivirus: {enabled: false}").unwrap();
        let files = rspamd_files(&no_av, 1000, &Endpoints::in_pod("r"));
        assert_eq!(files["antivirus.conf"], "");
    }
}
