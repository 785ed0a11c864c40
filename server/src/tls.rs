//! TLS for the QUIC client endpoint: the operator's certificate, or a self-signed one generated
//! once into the data dir. Its SHA-256 fingerprint is logged and written next to it, so that
//! clients can pin it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> TlsError {
    let context = context.into();
    move |source| TlsError::Io { context, source }
}

/// A certificate chain and its key, ready for rustls.
pub struct ServerIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// SHA-256 of the leaf certificate, lowercase hex.
    pub fingerprint: String,
}

/// SHA-256 of a DER certificate, as lowercase hex: what clients pin.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    hex::encode(digest.as_ref())
}

/// Writes a new self-signed certificate valid for `sans` into `dir` (cert.pem, key.pem,
/// fingerprint) and returns the fingerprint.
pub fn generate_self_signed(dir: &Path, sans: &[String]) -> Result<String, TlsError> {
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let certified = rcgen::generate_simple_self_signed(sans.to_vec())?;
    let fp = fingerprint(certified.cert.der());
    let key = dir.join("key.pem");
    write_private(&key, certified.signing_key.serialize_pem().as_bytes())
        .map_err(io(format!("writing {}", key.display())))?;
    write_durable(&dir.join("cert.pem"), certified.cert.pem().as_bytes(), 0o644).map_err(io("writing cert.pem"))?;
    write_durable(&dir.join("fingerprint"), format!("{fp}\n").as_bytes(), 0o644).map_err(io("writing fingerprint"))?;
    Ok(fp)
}

/// Writes a file only its owner can read (keys, credentials), and syncs it.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_durable(path, contents, 0o600)
}

/// Writes `contents` to `path` so that a power cut leaves either the old file or the whole new
/// one: a temporary file beside it, fsync'd, renamed over it, and the directory fsync'd. (A
/// plain write survives kill -9 but not a power cut: the chaos run's power-cut fault once left
/// a node's peer certificate empty, and the node never started again.)
pub fn write_durable(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| std::io::Error::other(format!("{} names no file", path.display())))?;
    let temp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&temp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Loads the configured certificate, or the node's own self-signed one (generating it on first
/// start, valid for localhost, 127.0.0.1 and the advertised host).
pub fn load_or_generate(
    configured: Option<&(PathBuf, PathBuf)>,
    data_dir: &Path,
    advertised_host: &str,
) -> Result<ServerIdentity, TlsError> {
    let (cert_path, key_path) = match configured {
        Some((c, k)) => (c.clone(), k.clone()),
        None => {
            let dir = data_dir.join("tls");
            let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
            if !c.exists() || !k.exists() {
                let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
                if !sans.iter().any(|s| s == advertised_host) {
                    sans.push(advertised_host.to_string());
                }
                generate_self_signed(&dir, &sans)?;
                tracing::info!(dir = %dir.display(), "generated a self-signed TLS certificate");
            }
            (c, k)
        }
    };
    let pem_err = |path: &Path| {
        let path = path.to_path_buf();
        move |e: rustls::pki_types::pem::Error| TlsError::Pem { path, message: e.to_string() }
    };
    let chain = CertificateDer::pem_file_iter(&cert_path)
        .map_err(pem_err(&cert_path))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(&cert_path))?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::Pem { path: cert_path, message: "no certificate in the file".into() });
    };
    let fingerprint = fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(pem_err(&key_path))?;
    if configured.is_none() {
        // Keep the fingerprint file true even if someone replaced the generated cert.
        let fp_path = data_dir.join("tls").join("fingerprint");
        if std::fs::read_to_string(&fp_path).ok().as_deref().map(str::trim) != Some(fingerprint.as_str()) {
            write_durable(&fp_path, format!("{fingerprint}\n").as_bytes(), 0o644)
                .map_err(io(format!("writing {}", fp_path.display())))?;
        }
    }
    Ok(ServerIdentity { chain, key, fingerprint })
}

/// rustls's server configuration for the HTTPS endpoint (`crate::web`): the client endpoint's
/// certificate, TLS 1.2 or 1.3 (load balancers' health checks), ALPN `http/1.1`.
pub fn web_crypto(identity: &ServerIdentity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let versions = rustls::DEFAULT_VERSIONS;
    crypto(identity.chain.clone(), identity.key.clone_key(), versions, b"http/1.1")
}

/// rustls's server configuration for the client endpoint: TLS 1.3 only, ALPN `chorus/1`.
pub fn server_crypto(identity: ServerIdentity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    crypto(identity.chain, identity.key, &[&rustls::version::TLS13], chorus_proto::ALPN)
}

fn crypto(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[u8],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_certificate_is_reused_and_its_fingerprint_written() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_generate(None, dir.path(), "10.1.2.3").unwrap();
        let second = load_or_generate(None, dir.path(), "10.1.2.3").unwrap();
        assert_eq!(first.fingerprint, second.fingerprint);
        assert_eq!(first.fingerprint.len(), 64);
        let written = std::fs::read_to_string(dir.path().join("tls/fingerprint")).unwrap();
        assert_eq!(written.trim(), first.fingerprint);
        server_crypto(second).unwrap();
    }

    #[test]
    fn a_bad_pem_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        std::fs::write(&cert, "not pem").unwrap();
        let err = load_or_generate(Some(&(cert.clone(), cert.clone())), dir.path(), "x").err().unwrap();
        assert!(err.to_string().contains("c.pem"), "{err}");
    }
}
