//! TLS for `grpcs://`: loading PEM files with clear errors, the client's
//! certificate checks (trusted CAs, or one pinned certificate), and the rustls
//! crypto provider (ring).

use std::path::Path;
use std::sync::{Arc, Once};

use echo_core::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::{ClientTls, ServerTlsFiles};

/// Installs ring as rustls' process-wide crypto provider unless one is already
/// installed. tonic's TLS acceptor asks rustls for the process default, which
/// panics when several providers are compiled in and none was chosen; this makes
/// the choice once, before any TLS config is built.
pub(crate) fn ensure_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // An error means another provider is installed already: keep it.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::Tls(format!("cannot read {what} {}: {e}", path.display())))
}

/// Every certificate in a PEM file; at least one.
fn certificates(path: &Path, what: &str) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>)> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{what} {}: bad PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{what} {}: no certificate found; expected a PEM file with \"-----BEGIN CERTIFICATE-----\" blocks",
            path.display()
        )));
    }
    Ok((pem, certs))
}

/// The server's TLS config from its certificate chain and key files.
pub(crate) fn server_config(files: &ServerTlsFiles) -> Result<ServerTlsConfig> {
    ensure_crypto_provider();
    let (cert_pem, _) = certificates(&files.cert, "certificate file")?;
    let key_pem = read(&files.key, "key file")?;
    PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        Error::Tls(format!(
            "key file {}: no usable private key ({e}); expected a PEM PKCS#8, PKCS#1 or SEC1 key",
            files.key.display()
        ))
    })?;
    Ok(ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem)))
}

/// How the client checks the server.
pub(crate) enum ClientCheck {
    /// Regular WebPKI checks against these trusted certificates.
    Roots(ClientTlsConfig),
    /// Only this certificate is accepted.
    Pinned(ClientTlsConfig, Arc<dyn ServerCertVerifier>),
}

/// The client's TLS config for `host` (the URL's host; `domain` overrides it).
pub(crate) fn client_config(tls: &ClientTls, host: &str) -> Result<ClientCheck> {
    ensure_crypto_provider();
    let domain = tls.domain.clone().unwrap_or_else(|| {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string()
    });
    let base = ClientTlsConfig::new().domain_name(domain);
    if let Some(ca) = &tls.ca {
        let (pem, certs) = certificates(ca, "CA file")?;
        let total = certs.len();
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(Error::Tls(format!(
                "CA file {}: none of its {total} certificates can be used as a trust anchor",
                ca.display()
            )));
        }
        return Ok(ClientCheck::Roots(
            base.ca_certificate(Certificate::from_pem(pem)),
        ));
    }
    let Some(pin) = &tls.pin else {
        return Err(Error::Tls(
            "grpcs:// needs ca=PATH or pin=PATH to check the server".into(),
        ));
    };
    let (_, certs) = certificates(pin, "pinned certificate file")?;
    if certs.len() != 1 {
        return Err(Error::Tls(format!(
            "pinned certificate file {}: holds {} certificates; expected exactly the server's one",
            pin.display(),
            certs.len()
        )));
    }
    let verifier = PinnedCertificate {
        cert: certs.into_iter().next().expect("one certificate"),
        algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
    };
    Ok(ClientCheck::Pinned(base, Arc::new(verifier)))
}

/// Accepts exactly one certificate (byte for byte), whatever name it carries, and
/// still checks that the server holds its private key (the handshake signature).
#[derive(Debug)]
struct PinnedCertificate {
    cert: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the server's certificate is not the pinned one".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_files_are_named() {
        let files = ServerTlsFiles {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
        };
        let e = server_config(&files).err().unwrap().to_string();
        assert!(
            e.contains("cannot read certificate file /nonexistent/cert.pem"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("echo-grpc-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a pem\n").unwrap();
        let tls = ClientTls {
            ca: Some(empty.clone()),
            pin: None,
            domain: None,
        };
        let e = client_config(&tls, "127.0.0.1").err().unwrap().to_string();
        assert!(e.contains("no certificate found"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
