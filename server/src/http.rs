//! Outgoing HTTPS: the client that fetches an identity provider's keys and posts
//! notifications, and the rule for which URLs it may use.

use std::time::Duration;

/// http:// is only for a service on this machine (tests, a local proxy); anything else must be
/// https://. `what` names the setting in the error.
pub fn check_url(url: &str, what: &str) -> Result<(), String> {
    if url.starts_with("https://") {
        return Ok(());
    }
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("{what} must start with https://, not {url}"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    if matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
        Ok(())
    } else {
        Err(format!("{what} must be https:// (http:// only on loopback), not {url}"))
    }
}

/// An HTTP client that trusts the system's roots, over rustls with ring, giving up on a request
/// after `timeout`.
pub fn client(timeout: Duration) -> Result<reqwest::Client, String> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        let _ = roots.add(cert);
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(timeout)
        .build()
        .map_err(|e| format!("HTTP client: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_reaches_this_machine() {
        for ok in ["https://example.com/x", "http://127.0.0.1:8080/hook", "http://localhost/", "http://[::1]:9/"] {
            assert!(check_url(ok, "the URL").is_ok(), "{ok}");
        }
        for bad in ["http://example.com/", "http://127.0.0.1.example.com/", "ftp://127.0.0.1/", "http://evil@x.com/"] {
            assert!(check_url(bad, "the URL").is_err(), "{bad}");
        }
    }
}
