//! One request's audit line, as JSON: every field the README lists, the
//! query's values removed, and no secret (moved here from a unit test so
//! that the tests have one log capture, `proxypilot_tests::logs`).

use std::sync::Arc;

use proxypilot::audit::{redact_path, ConnectionInfo, RequestAudit, RequestInfo};
use proxypilot_tests::logs::LogCapture;

#[test]
fn audit_line_has_fields_and_no_secret() {
    let cap = LogCapture::default();
    let sub = tracing_subscriber::fmt()
        .json()
        .with_writer(cap.make_writer())
        .finish();
    tracing::subscriber::with_default(sub, || {
        let a = RequestAudit::new(RequestInfo {
            conn: Arc::new(ConnectionInfo {
                pid: Some(42),
                comm: Some("curl".into()),
                original_dst: Some("203.0.113.10:443".parse().unwrap()),
                sni: "api.example.com".into(),
                secret_name: "EXAMPLE_SEALED".into(),
            }),
            method: http::Method::POST,
            path: redact_path("/v1/messages?api_key=sk-live-123"),
        });
        a.set_status(200);
        a.add_in(10);
        a.add_out(20);
    });
    let out = cap.text();
    let line: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let f = &line["fields"];
    assert_eq!(line["target"], "audit");
    assert_eq!(f["pid"], 42);
    assert_eq!(f["process"], "curl");
    assert_eq!(f["original_dst"], "203.0.113.10:443");
    assert_eq!(f["sni"], "api.example.com");
    assert_eq!(f["method"], "POST");
    assert_eq!(f["path"], "/v1/messages?api_key=");
    assert_eq!(f["status"], 200);
    assert_eq!(f["bytes_in"], 10);
    assert_eq!(f["bytes_out"], 20);
    assert_eq!(f["secret"], "EXAMPLE_SEALED");
    assert!(f["time"].as_str().unwrap().ends_with('Z'));
    assert!(f["duration_ms"].is_number());
    assert!(!out.contains("sk-live-123"));
}
