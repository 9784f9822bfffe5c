//! A real SMTP server for tests (aiosmtpd via tests/fixtures/smtp/server.py; the Python comes from
//! `EPIC_EXPORT_TEST_PYTHON`, which scripts/test.sh sets up; without it these tests fail).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

pub const USER: &str = "exports@example.org";
pub const PASSWORD: &str = "s3cret-bridge-password";

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smtp")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct SmtpServer {
    pub port: u16,
    pub maildir: tempfile::TempDir,
    _child: tokio::process::Child,
}

/// Starts tests/fixtures/smtp/server.py (`mode`: starttls or tls) and waits until it accepts connections.
pub async fn smtp_server(mode: &str) -> SmtpServer {
    smtp_server_with_cert(mode, "server").await
}

/// Like `smtp_server`, presenting tests/fixtures/smtp/`<cert>`.pem (key `<cert>`.key), e.g. `bridge`:
/// a certificate made like ProtonMail Bridge's own.
pub async fn smtp_server_with_cert(mode: &str, cert: &str) -> SmtpServer {
    let python = std::env::var("EPIC_EXPORT_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "EPIC_EXPORT_TEST_PYTHON is not set: these tests need a Python with aiosmtpd; run scripts/test.sh \
             (it makes target/smtp-venv and sets the variable), or set EPIC_EXPORT_TEST_PYTHON=target/smtp-venv/bin/python"
        )
    });
    let maildir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = tokio::process::Command::new(&python)
        .arg(fixtures().join("server.py"))
        .args(["--port", &port.to_string(), "--mode", mode])
        .arg("--cert")
        .arg(fixtures().join(format!("{cert}.pem")))
        .arg("--key")
        .arg(fixtures().join(format!("{cert}.key")))
        .args(["--user", USER, "--password", PASSWORD])
        .arg("--maildir")
        .arg(maildir.path())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {python} (EPIC_EXPORT_TEST_PYTHON): {e}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the SMTP test server did not start on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    SmtpServer {
        port,
        maildir,
        _child: child,
    }
}
