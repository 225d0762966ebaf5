//! The listeners' certificates (`listen_tls:`, `admin.listen_tls:`): PEM files read
//! into a rustls configuration whose certificate is swapped atomically when the files
//! change (`reload`, on the policy watcher's events, SIGHUP and `POST /reload`). A
//! handshake uses the certificate in force when it starts; one that fails to load
//! (unreadable, not PEM, a key that does not match) leaves the old one in force and
//! is reported as a failed policy reload is.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

use crate::config::TlsConfig;

/// What a reload of a listener's certificate did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertReload {
    /// The files are those in force.
    Unchanged,
    /// The new certificate is in force.
    Loaded,
    /// The new files cannot be used; the old certificate stays.
    Failed,
    /// The files that failed before, unchanged: the same failure, not a new one.
    StillFailing,
}

/// What `/status` shows of a listener's certificate.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CertInfo {
    /// The certificate chain's file.
    pub cert: String,
    /// The key's file.
    pub key: String,
    /// `sha256:<hex>` of the certificate in force (its DER), as `openssl x509
    /// -fingerprint -sha256` prints it, without colons.
    pub fingerprint: String,
    /// When it was loaded (RFC 3339).
    pub loaded_at: String,
    /// Why the files on disk were refused, while they are.
    pub last_error: Option<String>,
    /// Digest of the files last loaded or refused, to tell a change.
    #[serde(skip)]
    files_hash: String,
}

/// One listener's certificate, and the rustls configuration that serves it.
pub struct Certs {
    /// `listen` or `admin.listen`: which listener, in logs and reports.
    pub listener: &'static str,
    cert: PathBuf,
    key: PathBuf,
    current: Arc<ArcSwap<CertifiedKey>>,
    info: Mutex<CertInfo>,
    config: Arc<rustls::ServerConfig>,
}

/// Hands every handshake the certificate in force.
#[derive(Debug)]
struct Current(Arc<ArcSwap<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Certs {
    /// Loads the listener's certificate and key; an error says which file and why.
    pub fn load(listener: &'static str, tls: &TlsConfig) -> Result<Arc<Certs>, String> {
        let (key, hash) = read(&tls.cert, &tls.key)?;
        let info = CertInfo {
            cert: tls.cert.display().to_string(),
            key: tls.key.display().to_string(),
            fingerprint: fingerprint(&key),
            loaded_at: crate::audit::now_rfc3339(),
            last_error: None,
            files_hash: hash,
        };
        let current = Arc::new(ArcSwap::from_pointee(key));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("{listener}: TLS cannot be set up: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Current(current.clone())));
        // The listeners speak HTTP/1.1 only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(Certs {
            listener,
            cert: tls.cert.clone(),
            key: tls.key.clone(),
            current,
            info: Mutex::new(info),
            config: Arc::new(config),
        }))
    }

    /// The rustls configuration handshakes are made with.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.config.clone()
    }

    /// The files to watch.
    pub fn files(&self) -> [&Path; 2] {
        [&self.cert, &self.key]
    }

    /// What `/status` shows.
    pub fn info(&self) -> CertInfo {
        self.info.lock().clone()
    }

    /// Re-reads the files: a new certificate that loads is put in force for the next
    /// handshake; one that does not is refused once (the same files again are the
    /// same failure) and the old one stays. Returns the outcome and the error.
    pub fn reload(&self) -> (CertReload, Option<String>) {
        let mut info = self.info.lock();
        let loaded = read(&self.cert, &self.key);
        let hash = match &loaded {
            Ok((_, hash)) => hash.clone(),
            Err(_) => files_hash(&self.cert, &self.key),
        };
        if hash == info.files_hash {
            return match &info.last_error {
                None => (CertReload::Unchanged, None),
                Some(error) => (CertReload::StillFailing, Some(error.clone())),
            };
        }
        info.files_hash = hash;
        match loaded {
            Ok((key, _)) => {
                info.fingerprint = fingerprint(&key);
                info.loaded_at = crate::audit::now_rfc3339();
                info.last_error = None;
                self.current.store(Arc::new(key));
                (CertReload::Loaded, None)
            }
            Err(error) => {
                info.last_error = Some(error.clone());
                (CertReload::Failed, Some(error))
            }
        }
    }
}

/// Digest of what the two files hold now (empty parts for unreadable ones).
fn files_hash(cert: &Path, key: &Path) -> String {
    let mut hasher = Sha256::new();
    for path in [cert, key] {
        let bytes = std::fs::read(path).unwrap_or_default();
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(&bytes);
    }
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn fingerprint(key: &CertifiedKey) -> String {
    key.cert
        .first()
        .map(|der| format!("sha256:{}", hex(&Sha256::digest(der.as_ref()))))
        .unwrap_or_default()
}

/// Reads a certificate chain and its key, checks that they belong together, and
/// returns them with the digest of the two files.
fn read(cert: &Path, key: &Path) -> Result<(CertifiedKey, String), String> {
    let cert_pem = std::fs::read(cert)
        .map_err(|e| format!("{}: cannot read the certificate: {e}", cert.display()))?;
    let key_pem =
        std::fs::read(key).map_err(|e| format!("{}: cannot read the key: {e}", key.display()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: holds no certificate (expected -----BEGIN CERTIFICATE-----)",
            cert.display()
        ));
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!(
            "{}: not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
            key.display()
        )
    })?;
    let certified = CertifiedKey::from_der(chain, private, &provider()).map_err(|e| {
        format!(
            "{} and {} do not make a usable certificate: {e}",
            cert.display(),
            key.display()
        )
    })?;
    let mut hasher = Sha256::new();
    for bytes in [&cert_pem, &key_pem] {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    }
    Ok((certified, hex(&hasher.finalize())))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const A_CRT: &str = include_str!("../testdata/tls/a.crt");
    const A_KEY: &str = include_str!("../testdata/tls/a.key");
    const B_CRT: &str = include_str!("../testdata/tls/b.crt");
    const B_KEY: &str = include_str!("../testdata/tls/b.key");

    fn dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tollgate-tls-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write(dir: &Path, cert: &str, key: &str) {
        std::fs::write(dir.join("tls.crt"), cert).unwrap();
        std::fs::write(dir.join("tls.key"), key).unwrap();
    }

    #[test]
    fn a_new_certificate_is_swapped_in_and_a_bad_one_refused_once() {
        let dir = dir();
        write(&dir, A_CRT, A_KEY);
        let config = TlsConfig {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        };
        let certs = Certs::load("listen", &config).unwrap();
        let first = certs.info().fingerprint;
        assert!(first.starts_with("sha256:") && first.len() == 71, "{first}");
        assert_eq!(certs.reload(), (CertReload::Unchanged, None));

        write(&dir, B_CRT, B_KEY);
        assert_eq!(certs.reload(), (CertReload::Loaded, None));
        let second = certs.info().fingerprint;
        assert_ne!(first, second);
        assert_eq!(fingerprint(&certs.current.load()), second);

        // A's certificate with B's key: refused, B stays in force; the same files
        // again are the same failure, not a new one.
        write(&dir, A_CRT, B_KEY);
        let (outcome, error) = certs.reload();
        assert_eq!(outcome, CertReload::Failed);
        assert!(error.unwrap().contains("do not make a usable certificate"));
        assert_eq!(certs.reload().0, CertReload::StillFailing);
        assert_eq!(fingerprint(&certs.current.load()), second);
        assert!(certs.info().last_error.is_some());

        std::fs::write(dir.join("tls.crt"), "not PEM\n").unwrap();
        let (outcome, error) = certs.reload();
        assert_eq!(outcome, CertReload::Failed);
        assert!(error.unwrap().contains("holds no certificate"));

        // Fixed: back in force, the error cleared.
        write(&dir, A_CRT, A_KEY);
        assert_eq!(certs.reload(), (CertReload::Loaded, None));
        assert_eq!(certs.info().fingerprint, first);
        assert_eq!(certs.info().last_error, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_start_with_unusable_files_says_which_and_why() {
        let dir = dir();
        write(&dir, A_CRT, A_KEY);
        let missing = TlsConfig {
            cert: dir.join("tls.crt"),
            key: dir.join("nope.key"),
        };
        let error = Certs::load("listen", &missing).err().unwrap();
        assert!(error.contains("nope.key: cannot read the key"), "{error}");
        std::fs::write(dir.join("tls.key"), A_CRT).unwrap();
        let wrong = TlsConfig {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        };
        let error = Certs::load("listen", &wrong).err().unwrap();
        assert!(error.contains("not a PEM private key"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
