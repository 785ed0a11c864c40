//! Mutual TLS between nodes: a cluster CA, and one certificate per node naming its node id
//! (DNS name `node-<id>.chorus`). A node presents its certificate to every peer it calls and
//! requires one of the cluster's CA from every peer that calls it; the caller's certificate
//! must name the node id the caller says it is (`chorus-node-id`), and the callee's the node
//! the caller dialled. A peer without a certificate, with one of another CA, or with another
//! node's, is refused.
//!
//! `chorusd ca init` makes a CA; `chorusd ca issue` a node's certificate. A node started with
//! `--peer-ca-dir` issues its own from the CA there at first start; a single-node cluster with
//! no setting makes its own CA in its data dir.

use std::path::{Path, PathBuf};

use chorus_raft::NodeId;
pub use chorus_raft::network::PeerTls;
use chorus_raft::network::peer_name;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::config::PeerTlsSource;

#[derive(Debug, thiserror::Error)]
pub enum PeerTlsError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("making a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> PeerTlsError {
    let context = context.into();
    move |source| PeerTlsError::Io { context, source }
}

fn write_private(path: &Path, contents: &str) -> Result<(), PeerTlsError> {
    crate::tls::write_private(path, contents.as_bytes()).map_err(io(format!("writing {}", path.display())))
}

fn read(path: &Path) -> Result<String, PeerTlsError> {
    std::fs::read_to_string(path).map_err(io(format!("reading {}", path.display())))
}

/// Makes a cluster CA in `dir`: `ca.pem` and `ca.key` (mode 0600). Refuses to replace one.
pub fn ca_init(dir: &Path) -> Result<(), PeerTlsError> {
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    if cert.exists() || key.exists() {
        return Err(PeerTlsError::Invalid(format!("{} already holds a CA; remove it first", dir.display())));
    }
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let key_pair = KeyPair::generate()?;
    let ca = ca_params()?.self_signed(&key_pair)?;
    write_private(&key, &key_pair.serialize_pem())?;
    crate::tls::write_durable(&cert, ca.pem().as_bytes(), 0o644).map_err(io(format!("writing {}", cert.display())))?;
    Ok(())
}

/// What a CA made by [`ca_init`] says of itself. Issuing from it needs only these and its key:
/// the issuer's name and key identifier in a node certificate come from them.
fn ca_params() -> Result<CertificateParams, PeerTlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, "Chorus cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

/// Issues node `node`'s certificate from the CA in `ca_dir` (one made by [`ca_init`]) into
/// `out` (`node.pem`, `node.key` mode 0600, and a copy of `ca.pem`).
pub fn issue(ca_dir: &Path, node: NodeId, out: &Path) -> Result<(), PeerTlsError> {
    let ca_pem = read(&ca_dir.join("ca.pem"))?;
    let ca_key = KeyPair::from_pem(&read(&ca_dir.join("ca.key"))?)?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let key_pair = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![peer_name(node)])?;
    params.distinguished_name.push(DnType::CommonName, peer_name(node));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key_pair, &issuer)?;
    std::fs::create_dir_all(out).map_err(io(format!("creating {}", out.display())))?;
    write_private(&out.join("node.key"), &key_pair.serialize_pem())?;
    // The certificate last: a node whose `node.pem` exists has its key and CA too (a power cut
    // in between leaves no `node.pem`, and the next start issues them again).
    crate::tls::write_durable(&out.join("ca.pem"), ca_pem.as_bytes(), 0o644).map_err(io("writing ca.pem"))?;
    crate::tls::write_durable(&out.join("node.pem"), cert.pem().as_bytes(), 0o644).map_err(io("writing node.pem"))?;
    Ok(())
}

/// Whether a DER certificate is valid for node `node`'s name (its chain is checked by TLS).
pub fn names_node(cert: &CertificateDer<'_>, node: NodeId) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(cert) else { return false };
    let Ok(name) = ServerName::try_from(peer_name(node)) else { return false };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

/// Loads (or, per `source`, makes) this node's peer TLS material.
pub fn load(source: &PeerTlsSource, data_dir: &Path, node: NodeId) -> Result<PeerTls, PeerTlsError> {
    let own = data_dir.join("tls").join("peer");
    let (ca, cert, key): (PathBuf, PathBuf, PathBuf) = match source {
        PeerTlsSource::Files { ca, cert, key } => (ca.clone(), cert.clone(), key.clone()),
        PeerTlsSource::CaDir(dir) => {
            if !own.join("node.pem").exists() {
                issue(dir, node, &own)?;
                tracing::info!(dir = %own.display(), "issued this node's peer certificate from the cluster CA");
            }
            (own.join("ca.pem"), own.join("node.pem"), own.join("node.key"))
        }
        PeerTlsSource::Own => {
            let ca_dir = data_dir.join("tls").join("peer-ca");
            if !ca_dir.join("ca.pem").exists() {
                // `ca.pem` is written last: a key without it is what a power cut left of an
                // earlier start's `ca_init`, and no certificate was issued from it.
                let _ = std::fs::remove_file(ca_dir.join("ca.key"));
                ca_init(&ca_dir)?;
            }
            if !own.join("node.pem").exists() {
                issue(&ca_dir, node, &own)?;
            }
            (own.join("ca.pem"), own.join("node.pem"), own.join("node.key"))
        }
    };
    let tls = PeerTls { ca_pem: read(&ca)?, cert_pem: read(&cert)?, key_pem: read(&key)? };
    let leaf = CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
        .next()
        .ok_or_else(|| PeerTlsError::Invalid(format!("{}: no certificate", cert.display())))?
        .map_err(|e| PeerTlsError::Invalid(format!("{}: {e}", cert.display())))?;
    if !names_node(&leaf, node) {
        return Err(PeerTlsError::Invalid(format!(
            "{} is not a certificate of node {node} (it must name {}): issue one with `chorusd ca issue --node-id {node}`",
            cert.display(),
            peer_name(node)
        )));
    }
    Ok(tls)
}

/// The peer server's TLS: this node's certificate, and the cluster CA its callers' must be of.
pub fn server_config(tls: &PeerTls) -> tonic::transport::ServerTlsConfig {
    tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem))
        .client_ca_root(tonic::transport::Certificate::from_pem(&tls.ca_pem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_certificate_names_its_node_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        ca_init(&ca).unwrap();
        assert!(ca_init(&ca).is_err(), "a CA is never replaced");
        let out = dir.path().join("node-2");
        issue(&ca, 2, &out).unwrap();
        let pem = std::fs::read_to_string(out.join("node.pem")).unwrap();
        let der = CertificateDer::pem_slice_iter(pem.as_bytes()).next().unwrap().unwrap();
        assert!(names_node(&der, 2));
        assert!(!names_node(&der, 3));
        use std::os::unix::fs::PermissionsExt;
        for secret in [ca.join("ca.key"), out.join("node.key")] {
            assert_eq!(std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777, 0o600, "{secret:?}");
        }
        let loaded = load(&PeerTlsSource::CaDir(ca.clone()), &dir.path().join("data"), 5).unwrap();
        assert!(loaded.cert_pem.contains("BEGIN CERTIFICATE"));
        let wrong =
            PeerTlsSource::Files { ca: ca.join("ca.pem"), cert: out.join("node.pem"), key: out.join("node.key") };
        let err = load(&wrong, dir.path(), 3).unwrap_err().to_string();
        assert!(err.contains("not a certificate of node 3"), "{err}");
    }
}
