//! The DKIM keys of `spec.dkim`: one RSA key per domain in a Secret, generated when missing and never
//! replaced, and the TXT record each domain must publish.
//!
//! The Secret has no owner: deleting the MailPod keeps the keys, so a record already published stays
//! valid for the MailPod made again. A key someone put there is used as it is (PKCS#8 or PKCS#1 PEM).

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams};
use kube::ResourceExt;
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::RsaPrivateKey;

use super::error::{Error, Result};
use crate::crd::{dkim_key_name, DkimRecord, MailPod, ValidationErrors};
use crate::names::labels as l;

/// Size of the keys the operator generates: what receivers expect today (RFC 8301 asks for at least 1024,
/// 2048 fits one TXT record's strings).
pub const KEY_BITS: usize = 2048;

/// A new private key, PKCS#8 PEM.
pub fn generate_key() -> std::result::Result<String, String> {
    let mut rng = rsa::rand_core::OsRng;
    let key = RsaPrivateKey::new(&mut rng, KEY_BITS).map_err(|e| e.to_string())?;
    key.to_pkcs8_pem(LineEnding::LF)
        .map(|pem| pem.to_string())
        .map_err(|e| e.to_string())
}

/// The TXT record's text for a private key in PEM (PKCS#8 or PKCS#1).
pub fn txt_record(pem: &str) -> std::result::Result<String, String> {
    let key = RsaPrivateKey::from_pkcs8_pem(pem)
        .or_else(|_| RsaPrivateKey::from_pkcs1_pem(pem))
        .map_err(|_| "not an RSA private key in PEM (PKCS#8 or PKCS#1)".to_string())?;
    let der = key
        .to_public_key()
        .to_public_key_der()
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "v=DKIM1; k=rsa; p={}",
        base64::engine::general_purpose::STANDARD.encode(der.as_bytes())
    ))
}

/// What [`ensure_keys`] found.
pub enum Keys {
    /// No `spec.dkim`.
    Off,
    /// Every domain's record, in `spec.domains` order.
    Records(Vec<DkimRecord>),
    /// A key in the Secret cannot be used: the MailPod is refused, naming it.
    Invalid(ValidationErrors),
}

/// Makes sure the Secret holds a key for every domain of `mp` (creating it, or adding only the keys it
/// lacks, with the Secret's resourceVersion as precondition), and returns the records.
pub async fn ensure_keys(client: &kube::Client, ns: &str, mp: &MailPod) -> Result<Keys> {
    let Some(spec) = &mp.spec.dkim else {
        return Ok(Keys::Off);
    };
    let name = spec.secret(&mp.name_any());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let current = secrets.get_opt(&name).await.map_err(|source| Error::Read {
        what: format!("Secret {name}"),
        source,
    })?;
    let held: BTreeMap<String, String> = current
        .as_ref()
        .and_then(|s| s.data.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
        .collect();
    let mut added = BTreeMap::new();
    let mut records = vec![];
    let mut errs = ValidationErrors::default();
    for domain in &mp.spec.domains {
        let key_name = dkim_key_name(domain, &spec.selector);
        let pem = match held.get(&key_name) {
            Some(pem) => pem.clone(),
            None => {
                let pem = generate_key().map_err(Error::Random)?;
                added.insert(key_name.clone(), ByteString(pem.clone().into_bytes()));
                pem
            }
        };
        match txt_record(&pem) {
            Ok(txt) => records.push(DkimRecord {
                domain: domain.clone(),
                selector: spec.selector.clone(),
                name: format!("{}._domainkey.{domain}", spec.selector),
                txt,
            }),
            Err(e) => errs.push(
                "spec.dkim.secretName",
                format!("Secret {name}, key {key_name}: {e}"),
            ),
        }
    }
    if !errs.is_empty() {
        return Ok(Keys::Invalid(errs));
    }
    if added.is_empty() {
        return Ok(Keys::Records(records));
    }
    let write = |source| Error::Apply {
        kind: "Secret",
        name: name.clone(),
        source,
    };
    match current {
        None => {
            let secret = Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(ns.to_string()),
                    labels: Some(BTreeMap::from([
                        (l::MAILPOD.to_string(), mp.name_any()),
                        (l::MANAGED_BY.to_string(), l::MANAGER.to_string()),
                    ])),
                    ..Default::default()
                },
                data: Some(added),
                type_: Some("Opaque".into()),
                ..Default::default()
            };
            secrets
                .create(&Default::default(), &secret)
                .await
                .map_err(write)?;
        }
        Some(s) => {
            // Only the missing keys, and only onto the Secret as read: a key written meanwhile is kept.
            let patch = serde_json::json!({
                "metadata": { "resourceVersion": s.resource_version() },
                "data": added,
            });
            secrets
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(write)?;
        }
    }
    tracing::info!(mailpod = %mp.name_any(), secret = %name, "DKIM keys generated");
    Ok(Keys::Records(records))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_gives_a_record_of_its_public_half() {
        let pem = generate_key().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
        let txt = txt_record(&pem).unwrap();
        let p = txt.strip_prefix("v=DKIM1; k=rsa; p=").unwrap();
        let der = base64::engine::general_purpose::STANDARD.decode(p).unwrap();
        use rsa::pkcs8::DecodePublicKey;
        let public = rsa::RsaPublicKey::from_public_key_der(&der).unwrap();
        let private = RsaPrivateKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(public, private.to_public_key());
        assert_eq!(rsa::traits::PublicKeyParts::size(&public) * 8, KEY_BITS);
        // The same key in PKCS#1 gives the same record; anything else is refused.
        use rsa::pkcs1::EncodeRsaPrivateKey;
        let pkcs1 = private.to_pkcs1_pem(LineEnding::LF).unwrap();
        assert_eq!(txt_record(&pkcs1).unwrap(), txt);
        assert!(txt_record("not a key").is_err());
    }
}
