//! How the client trusts a node's certificate: pinned SHA-256 fingerprints (what chorusd's
//! self-signed certificates need), a CA certificate file, or — for development only — not at
//! all. Handshake signatures are always verified.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use crate::ClientError;

/// Which server certificates to accept.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Certificates whose SHA-256 is one of these (e.g. from `<data-dir>/tls/fingerprint`).
    Fingerprints(Vec<[u8; 32]>),
    /// Certificates issued by the CA in this PEM file.
    CaFile(PathBuf),
    /// Any certificate. Only for development: it gives up on knowing who you talk to.
    Insecure,
}

/// Decodes hex (either case) of exactly `N` bytes.
pub(crate) fn decode_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// Parses a hex SHA-256 fingerprint (colons allowed, any case).
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], ClientError> {
    let digits: String = text.chars().filter(|c| *c != ':' && !c.is_whitespace()).collect();
    let mut out = [0u8; 32];
    hex::decode_to_slice(&digits, &mut out)
        .map_err(|_| ClientError::Config(format!("{text:?} is not a SHA-256 fingerprint (64 hex digits)")))?;
    Ok(out)
}

#[derive(Debug)]
struct PinnedVerifier {
    pins: Vec<[u8; 32]>,
    provider: Arc<CryptoProvider>,
    insecure: bool,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.insecure {
            return Ok(ServerCertVerified::assertion());
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        if self.pins.iter().any(|pin| pin.as_slice() == digest.as_ref()) {
            Ok(ServerCertVerified::assertion())
        } else {
            let hex = hex::encode(digest.as_ref());
            Err(rustls::Error::General(format!(
                "the server's certificate (SHA-256 {hex}) matches no pinned fingerprint"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// rustls's client configuration for `trust`: TLS 1.3, ALPN `chorus/1`.
pub fn client_crypto(trust: &Trust) -> Result<rustls::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(format!("TLS: {e}")))?;
    let mut config = match trust {
        Trust::CaFile(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| ClientError::Config(format!("reading CA certificates from {}: {e}", path.display())))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| ClientError::Config(format!("CA certificate in {}: {e}", path.display())))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Fingerprints(pins) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                pins: pins.clone(),
                provider,
                insecure: false,
            }))
            .with_no_client_auth(),
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier { pins: Vec::new(), provider, insecure: true }))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![chorus_proto::ALPN.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_fingerprint(&hex).unwrap(), [0xab; 32]);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&colons).unwrap(), [0xab; 32]);
        assert!(parse_fingerprint("abc").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
        // 64 bytes, but not 64 characters: once a panic (a byte-index slice inside 'é').
        assert!(parse_fingerprint(&"é".repeat(32)).is_err());
        assert!(parse_fingerprint(&format!("{}é", "a".repeat(62))).is_err());
    }
}
