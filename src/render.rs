//! `mailpod-operator render`: every object the operator would apply for the given resources, with no
//! cluster. It runs the same pure builders as the controllers, following the chain MailPod → StorageLUN →
//! store objects, and resolves mailbox lists from ConfigMaps and Secrets given among the input files.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use serde_json::Value;

use crate::controller::lun::replication;
use crate::crd::{MailPod, MailboxSource, ReplicationMethod, SiteFailover, StorageLUN};
use crate::resources::{self, lun::assignments, mailboxes, Child};

/// One input document that cannot be rendered: which file, which object, which field, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderError {
    pub file: String,
    pub object: String,
    pub message: String,
}

impl fmt::Display for RenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.object.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.object, self.message)
        }
    }
}

/// Errors of a whole run, one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderErrors(pub Vec<RenderError>);

impl fmt::Display for RenderErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.0 {
            writeln!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RenderErrors {}

/// One parsed input document and the file it came from.
#[allow(clippy::large_enum_variant)]
enum Input {
    MailPod(MailPod),
    StorageLUN(StorageLUN),
    SiteFailover(SiteFailover),
    ConfigMap(ConfigMap),
    Secret(Secret),
}

struct Doc {
    file: String,
    input: Input,
}

/// Options of a render run.
pub struct Options {
    /// Namespace of input objects that name none.
    pub namespace: String,
    /// Image of mail pods whose resources name none.
    pub image: String,
    /// The cluster's DNS domain (see `resources::service_host`).
    pub cluster_domain: String,
    /// The namespace the operator runs in (see `resources::Defaults`).
    pub operator_namespace: Option<String>,
}

impl Options {
    fn defaults(&self) -> resources::Defaults<'_> {
        resources::Defaults {
            image: &self.image,
            cluster_domain: &self.cluster_domain,
            operator_namespace: self.operator_namespace.as_deref(),
        }
    }
}

/// Renders `files` (name, content) to multi-document YAML. Nothing is returned on any error.
pub fn render(files: &[(String, String)], opts: &Options) -> Result<String, RenderErrors> {
    let mut errs = vec![];
    let mut docs = vec![];
    for (file, text) in files {
        match parse_file(file, text, &opts.namespace) {
            Ok(mut d) => docs.append(&mut d),
            Err(mut e) => errs.append(&mut e),
        }
    }
    let children = build_all(&docs, opts, &mut errs);
    if !errs.is_empty() {
        return Err(RenderErrors(errs));
    }
    let mut out = String::new();
    for object in children {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&object).expect("objects serialize"));
    }
    Ok(out)
}

fn parse_file(file: &str, text: &str, namespace: &str) -> Result<Vec<Doc>, Vec<RenderError>> {
    let mut docs = vec![];
    let mut errs = vec![];
    for (n, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(de) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errs.push(err(file, "", format!("document {}: not YAML: {e}", n + 1)));
                continue;
            }
        };
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_string();
        let api_version = value
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_string();
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|k| k.as_str())
            .unwrap_or("<unnamed>")
            .to_string();
        let object = format!("{kind} {name}");
        let input = match (kind.as_str(), api_version.as_str()) {
            ("MailPod", "mailpod.io/v1alpha1") => strict::<MailPod>(value).map(Input::MailPod),
            ("StorageLUN", "mailpod.io/v1alpha1") => strict::<StorageLUN>(value).map(Input::StorageLUN),
            ("SiteFailover", "mailpod.io/v1alpha1") => strict::<SiteFailover>(value).map(Input::SiteFailover),
            ("ConfigMap", "v1") => strict::<ConfigMap>(value).map(Input::ConfigMap),
            ("Secret", "v1") => strict::<Secret>(value).map(Input::Secret),
            ("", _) => Err(format!("document {}: no `kind`", n + 1)),
            (k, v) => Err(format!(
                "unsupported kind `{k}` (apiVersion `{v}`): render reads mailpod.io/v1alpha1 MailPod, StorageLUN, SiteFailover and v1 ConfigMap, Secret"
            )),
        };
        match input {
            Ok(mut input) => {
                set_namespace(&mut input, namespace);
                docs.push(Doc {
                    file: file.to_string(),
                    input,
                })
            }
            Err(message) => errs.push(err(file, &object, message)),
        }
    }
    if errs.is_empty() {
        Ok(docs)
    } else {
        Err(errs)
    }
}

/// Deserializes, rejecting fields the type does not have (a typo would otherwise be silently ignored);
/// an error names the field it is about (`spec.domains: invalid type: integer `17`, expected a sequence`).
fn strict<T: DeserializeOwned>(value: serde_yaml::Value) -> Result<T, String> {
    let mut unknown = vec![];
    let parsed: Result<T, _> =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut |path| {
            let p = path.to_string();
            if p != "apiVersion" && p != "kind" && p != "status" && !p.starts_with("status.") {
                unknown.push(p);
            }
        }));
    let parsed = parsed.map_err(|e| match e.path().to_string().as_str() {
        "." | "" => e.inner().to_string(),
        path => format!("{path}: {}", e.inner()),
    })?;
    match unknown.first() {
        Some(p) => Err(format!("{p}: unknown field")),
        None => Ok(parsed),
    }
}

fn set_namespace(input: &mut Input, namespace: &str) {
    let meta = match input {
        Input::MailPod(o) => &mut o.metadata,
        Input::StorageLUN(o) => &mut o.metadata,
        Input::SiteFailover(o) => &mut o.metadata,
        Input::ConfigMap(o) => &mut o.metadata,
        Input::Secret(o) => &mut o.metadata,
    };
    meta.namespace.get_or_insert_with(|| namespace.to_string());
}

fn err(file: &str, object: &str, message: impl Into<String>) -> RenderError {
    RenderError {
        file: file.to_string(),
        object: object.to_string(),
        message: message.into(),
    }
}

/// Text of a mailbox source among the inputs, in `namespace`.
fn lookup_source<'a>(
    docs: &'a [Doc],
    namespace: &'a str,
) -> impl Fn(&MailboxSource) -> Option<String> + 'a {
    move |src: &MailboxSource| {
        docs.iter()
            .find_map(|d| match (&d.input, &src.config_map, &src.secret) {
                (Input::ConfigMap(cm), Some(r), _)
                    if cm.name_any() == r.name && cm.namespace().as_deref() == Some(namespace) =>
                {
                    cm.data.as_ref().and_then(|data| data.get(&r.key)).cloned()
                }
                (Input::Secret(s), _, Some(r))
                    if s.name_any() == r.name && s.namespace().as_deref() == Some(namespace) =>
                {
                    s.string_data
                        .as_ref()
                        .and_then(|d| d.get(&r.key).cloned())
                        .or_else(|| {
                            s.data
                                .as_ref()
                                .and_then(|d| d.get(&r.key))
                                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                        })
                }
                _ => None,
            })
    }
}

/// What the StorageLUN controller applies for `lun` once it has settled: the store objects and, for block
/// replication, a VolumeReplication per replica (secondary, with no store running, while fenced).
fn lun_objects(lun: &StorageLUN, defaults: &resources::Defaults) -> Vec<Value> {
    let mut children = resources::store::build(lun, defaults);
    let volume = lun.spec.replication.method == ReplicationMethod::Volume;
    if volume && lun.spec.fenced {
        resources::store::set_store_replicas(&mut children, 0);
    }
    let mut out: Vec<Value> = children.iter().map(Child::to_json).collect();
    if volume {
        out.extend(replication::build(lun));
    }
    out
}

fn build_all(docs: &[Doc], opts: &Options, errs: &mut Vec<RenderError>) -> Vec<Value> {
    let mut out = vec![];
    // StorageLUNs among the inputs: a MailPod's existing placement, or standalone LUNs.
    let mut owned_luns: BTreeMap<(String, String), Vec<&StorageLUN>> = BTreeMap::new();
    let mailpods: Vec<(String, String)> = docs
        .iter()
        .filter_map(|d| match &d.input {
            Input::MailPod(mp) => Some((mp.namespace().unwrap_or_default(), mp.name_any())),
            _ => None,
        })
        .collect();
    for d in docs {
        if let Input::StorageLUN(lun) = &d.input {
            let key = (
                lun.namespace().unwrap_or_default(),
                lun.spec.mail_pod.clone(),
            );
            if mailpods.contains(&key) {
                owned_luns.entry(key).or_default().push(lun);
            }
        }
    }
    for d in docs {
        match &d.input {
            Input::MailPod(mp) => {
                let object = format!("MailPod {}", mp.name_any());
                let ns = mp.namespace().unwrap_or_default();
                let resolved = match mailboxes::validate_and_resolve(mp, &lookup_source(docs, &ns))
                {
                    Ok(m) => m,
                    Err(e) => {
                        errs.extend(e.0.iter().map(|fe| err(&d.file, &object, fe.to_string())));
                        continue;
                    }
                };
                let owned = owned_luns
                    .get(&(ns.clone(), mp.name_any()))
                    .cloned()
                    .unwrap_or_default();
                let known = match resources::lun::recorded_incarnations(owned.iter().copied()) {
                    Ok(k) => k,
                    Err((path, message)) => {
                        errs.push(err(&d.file, &object, format!("{path}: {message}")));
                        continue;
                    }
                };
                let existing = assignments(owned.iter().copied(), &known);
                match resources::mailpod::build(mp, &resolved, &existing, &opts.defaults()) {
                    Ok(desired) => {
                        for child in desired.children {
                            let lun_children = match &child {
                                Child::StorageLUN(lun) => lun_objects(lun, &opts.defaults()),
                                _ => vec![],
                            };
                            out.push(child.to_json());
                            out.extend(lun_children);
                        }
                    }
                    Err(e) => {
                        errs.extend(e.0.iter().map(|fe| err(&d.file, &object, fe.to_string())))
                    }
                }
            }
            Input::StorageLUN(lun) => {
                let key = (
                    lun.namespace().unwrap_or_default(),
                    lun.spec.mail_pod.clone(),
                );
                if mailpods.contains(&key) {
                    continue; // rendered through its MailPod, with the placement it records
                }
                match lun.validate() {
                    Ok(()) => out.extend(lun_objects(lun, &opts.defaults())),
                    Err(e) => errs.extend(e.0.iter().map(|fe| {
                        err(
                            &d.file,
                            &format!("StorageLUN {}", lun.name_any()),
                            fe.to_string(),
                        )
                    })),
                }
            }
            Input::SiteFailover(sf) => {
                if let Err(e) = sf.spec.validate() {
                    errs.extend(e.0.iter().map(|fe| {
                        err(
                            &d.file,
                            &format!("SiteFailover {}", sf.name_any()),
                            fe.to_string(),
                        )
                    }));
                }
            }
            Input::ConfigMap(_) | Input::Secret(_) => {}
        }
    }
    out
}
