//! A DNSBL without a reply filter counts any answer (Spamhaus answers 127.255.255.254 to queries through
//! public resolvers, so every client would score): the Rust validation and the CRD's CEL rule both ask for
//! a filter, agree on every case, and name the field.

use kube::CustomResourceExt;
use mailpod_operator::crd::MailPod;
use serde_json::{json, Value};

fn schema() -> Value {
    serde_json::to_value(
        MailPod::crd().spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

fn with_dnsbl(dnsbl: &[&str]) -> Value {
    json!({"apiVersion": "mailpod.io/v1alpha1", "kind": "MailPod", "metadata": {"name": "m"},
           "spec": {"domains": ["example.com"], "tls": {"secretName": "m-tls"},
                    "protection": {"dnsbl": dnsbl, "dnsblThreshold": 2}}})
}

#[test]
fn every_dnsbl_needs_a_reply_filter_in_rust_and_in_cel() {
    let schema = schema();
    let cases: &[(&str, bool)] = &[
        ("zen.spamhaus.org=127.0.0.[2..11]", true),
        ("zen.spamhaus.org=127.0.0.[2..11]*2", true),
        ("bl.spamcop.net=127.0.0.2", true),
        ("b.barracudacentral.org=127.0.0.2*1", true),
        ("list.dnswl.org=127.0.[0..255].[1..3]*-2", true),
        ("dnsbl.example=127.0.0.[2;4;10..12]", true),
        ("zen.spamhaus.org", false),
        ("zen.spamhaus.org*2", false),
        ("zen.spamhaus.org=", false),
        ("zen.spamhaus.org=127.0.0", false),
        ("zen.spamhaus.org=127.0.0.2.1", false),
        ("zen.spamhaus.org=127.0.0.[2..]", false),
        ("zen.spamhaus.org=127.0.0.[2..11]*x", false),
        ("zen.spamhaus.org=127.0.0.1234", false),
        ("not a name=127.0.0.2", false),
    ];
    for (entry, ok) in cases {
        let obj = with_dnsbl(&[entry]);
        let by_cel = kube_cel::validate(&schema, &obj, None).map_err(|e| format!("{e:?}"));
        assert_eq!(by_cel.is_ok(), *ok, "CEL on {entry}: {by_cel:?}");
        let typed: MailPod = serde_json::from_value(obj).unwrap();
        let by_rust = typed.validate();
        assert_eq!(by_rust.is_ok(), *ok, "Rust on {entry}: {by_rust:?}");
        if let Err(e) = by_rust {
            let text = e.to_string();
            assert!(text.contains("spec.protection.dnsbl[0]"), "{entry}: {text}");
        }
        if let Err(e) = by_cel {
            assert!(e.contains("reply filter"), "{entry}: {e}");
        }
    }
    // The index of the entry at fault is named, and a missing filter is explained.
    let typed: MailPod = serde_json::from_value(with_dnsbl(&[
        "bl.spamcop.net=127.0.0.2",
        "zen.spamhaus.org*2",
    ]))
    .unwrap();
    let text = typed.validate().unwrap_err().to_string();
    assert!(text.contains("spec.protection.dnsbl[1]"), "{text}");
    assert!(text.contains("no reply filter"), "{text}");
    assert!(text.contains("zen.spamhaus.org=127.0.0.[2..11]"), "{text}");
}

#[test]
fn the_examples_use_reply_filters() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = match serde::Deserialize::deserialize(doc) {
                Ok(v) => v,
                Err(_) => continue,
            };
            if v["kind"] != "MailPod" {
                continue;
            }
            for site in v["spec"]["protection"]["dnsbl"]
                .as_array()
                .into_iter()
                .flatten()
            {
                seen += 1;
                let site = site.as_str().unwrap();
                assert!(
                    mailpod_operator::crd::dnsbl_entry_problem(site).is_none(),
                    "{}: {site}",
                    path.display()
                );
            }
        }
    }
    assert!(seen > 0, "no example names a DNSBL");
}
