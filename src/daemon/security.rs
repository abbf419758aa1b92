//! Credentials made at first start: the admin API token and the self-signed TLS
//! certificate of the HTTPS listener. Both live in the data directory, readable by the
//! owner only, and are reused at every later start.

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

/// File name of the admin token in the data directory.
pub const TOKEN_FILE: &str = "admin.token";
/// Directory of the TLS certificate and key in the data directory.
pub const TLS_DIR: &str = "tls";
/// Certificate file name inside [`TLS_DIR`].
pub const CERT_FILE: &str = "cert.pem";
/// Key file name inside [`TLS_DIR`].
pub const KEY_FILE: &str = "key.pem";

/// Writes `contents` to a new file readable by the owner only.
fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    Ok(())
}

/// Refuses a secret file that others can read: someone changed it, or it was copied
/// carelessly, and the admin should know before the daemon trusts it.
fn check_private(path: &Path) -> Result<()> {
    let mode = fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        bail!(
            "{} is readable by others (mode {:o}); run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    Ok(())
}

/// Loads the admin token, making one at first start.
pub fn admin_token(data_dir: &Path) -> Result<String> {
    let path = data_dir.join(TOKEN_FILE);
    if !path.exists() {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw)
            .map_err(|e| anyhow::anyhow!("no randomness for the admin token: {e}"))?;
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        write_private(&path, format!("{token}\n").as_bytes())?;
        tracing::info!(path = %path.display(), "created admin API token");
    }
    check_private(&path)?;
    let token = fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .trim()
        .to_string();
    if token.len() < 32 {
        bail!(
            "{} holds no usable token; delete it to make a new one",
            path.display()
        );
    }
    Ok(token)
}

/// Loads the TLS server configuration, making a self-signed certificate at first start.
pub fn tls_config(data_dir: &Path, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>> {
    let dir = data_dir.join(TLS_DIR);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    if !cert_path.exists() || !key_path.exists() {
        let mut names = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        if let Ok(host) = hostname::get() {
            if let Some(host) = host.to_str() {
                names.push(host.to_string());
            }
        }
        let certified = rcgen::generate_simple_self_signed(names)
            .context("cannot make the self-signed TLS certificate")?;
        let _ = fs::remove_file(&key_path);
        write_private(&key_path, certified.signing_key.serialize_pem().as_bytes())?;
        let _ = fs::remove_file(&cert_path);
        fs::write(&cert_path, certified.cert.pem())
            .with_context(|| format!("cannot write {}", cert_path.display()))?;
        tracing::info!(path = %cert_path.display(), "created self-signed TLS certificate");
    }
    check_private(&key_path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("cannot read {}", cert_path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate", cert_path.display()))?;
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("{} is not a PEM private key", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the TLS certificate and key do not match")?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Compares a presented token with the admin token in constant time.
pub fn token_matches(presented: &[u8], expected: &[u8]) -> bool {
    if presented.len() != expected.len() {
        return false;
    }
    presented
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_made_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let t1 = admin_token(dir.path()).unwrap();
        let t2 = admin_token(dir.path()).unwrap();
        assert_eq!(t1, t2);
        assert_eq!(t1.len(), 64);
        let mode = fs::metadata(dir.path().join(TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::set_permissions(
            dir.path().join(TOKEN_FILE),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(
            admin_token(dir.path()).is_err(),
            "world-readable token refused"
        );
    }

    #[test]
    fn tls_config_is_made_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        tls_config(dir.path(), &[]).unwrap();
        let cert1 = fs::read(dir.path().join(TLS_DIR).join(CERT_FILE)).unwrap();
        tls_config(dir.path(), &[]).unwrap();
        let cert2 = fs::read(dir.path().join(TLS_DIR).join(CERT_FILE)).unwrap();
        assert_eq!(cert1, cert2);
    }

    #[test]
    fn token_comparison() {
        assert!(token_matches(b"abc", b"abc"));
        assert!(!token_matches(b"abd", b"abc"));
        assert!(!token_matches(b"ab", b"abc"));
    }
}
