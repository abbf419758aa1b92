//! The REST API's security and documents, checked with curl.

mod common;
use common::*;

#[test]
fn every_api_call_needs_the_token() {
    let dir = tempdir();
    let d = Daemon::start(&dir.path().join("var"), Some(EPHEMERAL));
    let token = d.token();

    for path in [
        "/api/v1/status",
        "/api/v1/disks",
        "/api/v1/config",
        "/api/v1/openapi.json",
        "/api/v1/nonexistent",
    ] {
        let (code, body) = d.curl(path, None, &[]);
        assert_eq!(code, 401, "{path} without a token: {body}");
        assert!(body.contains("\"unauthorized\""), "{body}");
        let (code, _) = d.curl(
            path,
            Some("0000000000000000000000000000000000000000000000000000000000000000"),
            &[],
        );
        assert_eq!(code, 401, "{path} with a wrong token");
    }
    // Mutations too, and nothing changes.
    let (code, _) = d.curl(
        "/api/v1/disks",
        None,
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"name":"x","size":"1M"}"#,
        ],
    );
    assert_eq!(code, 401);
    let (code, _) = d.curl(
        "/api/v1/config",
        None,
        &["-X", "PUT", "--data-binary", "version = 1\n"],
    );
    assert_eq!(code, 401);
    assert!(!d.data_dir.join("disks/x.img").exists());

    let (code, body) = d.curl("/api/v1/status", Some(&token), &[]);
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["disks"]["total"], 0);

    // The unix socket enforces the token as well.
    let socket = d.data_dir.join("basalt.sock");
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
        ])
        .arg(&socket)
        .arg("http://localhost/api/v1/status")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");
}

#[test]
fn health_and_metrics_need_no_token() {
    let dir = tempdir();
    let d = Daemon::start(&dir.path().join("var"), Some(EPHEMERAL));
    let (code, body) = d.curl("/healthz", None, &[]);
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, body) = d.curl("/metrics", None, &[]);
    assert_eq!(code, 200);
    assert!(body.contains("basalt_build_info{"), "{body}");
}

#[test]
fn tls_certificate_verifies_and_credentials_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir();
    let d = Daemon::start(&dir.path().join("var"), Some(EPHEMERAL));
    // curl verified the self-signed certificate for "localhost" in Daemon::curl; a client
    // without it must refuse the connection.
    let url = format!("https://localhost:{}/healthz", d.port());
    let out = std::process::Command::new("curl")
        .args(["-sS", &url])
        .output()
        .unwrap();
    assert!(!out.status.success(), "curl trusted an unknown certificate");
    for secret in ["admin.token", "tls/key.pem", "basalt.sock"] {
        let mode = std::fs::metadata(d.data_dir.join(secret))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{secret} has mode {:o}", mode & 0o777);
    }
}

#[test]
fn openapi_document_lists_the_endpoints() {
    let dir = tempdir();
    let d = Daemon::start(&dir.path().join("var"), Some(EPHEMERAL));
    let (code, body) = d.curl("/api/v1/openapi.json", Some(&d.token()), &[]);
    assert_eq!(code, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/v1/status",
        "/api/v1/disks",
        "/api/v1/disks/{name}",
        "/api/v1/config",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(doc["components"]["securitySchemes"]["token"].is_object());
}

#[test]
fn remote_cli_over_https() {
    let dir = tempdir();
    let d = Daemon::start(&dir.path().join("var"), Some(EPHEMERAL));
    let url = format!("https://localhost:{}", d.port());
    let other = dir.path().join("elsewhere");
    std::fs::create_dir_all(&other).unwrap();
    let run: Run = std::process::Command::new(BASALT)
        .arg("--data-dir")
        .arg(&other)
        .args(["--url", &url, "--token", &d.token(), "--ca-cert"])
        .arg(d.cert())
        .args(["--json", "status"])
        .output()
        .unwrap()
        .into();
    let run = run.ok();
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["disks"]["total"], 0);

    let run: Run = std::process::Command::new(BASALT)
        .arg("--data-dir")
        .arg(&other)
        .args(["--url", &url, "--token", "wrong", "--ca-cert"])
        .arg(d.cert())
        .arg("status")
        .output()
        .unwrap()
        .into();
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("missing or invalid API token"),
        "{}",
        run.stderr
    );
}
