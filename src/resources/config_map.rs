//! The access-tables and mail-settings ConfigMaps of a MailPod.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;

use super::mailpod::Context;
use crate::mailconfig::settings::{MailSettings, SETTINGS_KEY};
use crate::mailconfig::tables::data_hash;
use crate::names;

/// Annotation carrying the content hash of a ConfigMap's data.
pub const HASH_ANNOTATION: &str = "mailpod.io/content-hash";

const COMPONENT: &str = "config";

pub fn access_tables(ctx: &Context, data: BTreeMap<String, String>) -> ConfigMap {
    with_hash(ConfigMap {
        metadata: ctx.meta(names::access_tables(ctx.name()), COMPONENT),
        data: Some(data),
        ..Default::default()
    })
}

pub fn mail_settings(ctx: &Context) -> ConfigMap {
    let settings = MailSettings::build(ctx.name(), ctx.spec());
    with_hash(ConfigMap {
        metadata: ctx.meta(names::mail_settings(ctx.name()), COMPONENT),
        data: Some(BTreeMap::from([(
            SETTINGS_KEY.to_string(),
            settings.to_yaml(),
        )])),
        ..Default::default()
    })
}

fn with_hash(mut cm: ConfigMap) -> ConfigMap {
    let hash = data_hash(cm.data.as_ref().expect("data set above"));
    cm.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(HASH_ANNOTATION.to_string(), hash);
    cm
}
