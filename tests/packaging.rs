//! What `cargo build`, `cargo install` and the image get: the product only. The in-memory API of
//! src/testkit and `bench-operator` come with the `testkit` feature, which only the tests and benches
//! enable (through the dev-dependency on this crate itself).

use serde_json::Value;

fn metadata() -> Value {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all: Value = serde_json::from_slice(&out.stdout).unwrap();
    all["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "mailpod-operator")
        .cloned()
        .unwrap()
}

#[test]
fn the_default_build_has_no_testkit_and_the_tests_enable_it() {
    let package = metadata();
    assert_eq!(
        package["features"]["default"],
        serde_json::json!([]),
        "no default features: the test kit is not the product"
    );
    let bench = package["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "bench-operator")
        .expect("bench-operator target");
    assert_eq!(bench["required-features"], serde_json::json!(["testkit"]));
    let itself = package["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "mailpod-operator")
        .expect("a dev-dependency on the crate itself");
    assert_eq!(itself["kind"], "dev");
    assert_eq!(itself["features"], serde_json::json!(["testkit"]));
}

/// The test kit really is in the tests' build (this compiles only with it): the in-memory API answers.
#[tokio::test]
async fn the_in_memory_api_is_there_for_the_tests() {
    let server = mailpod_operator::testkit::ApiServer::new();
    let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(server.client(), "t");
    assert!(api.get_opt("none").await.unwrap().is_none());
    assert_eq!(server.requests().len(), 1);
}
