//! TLS for `quic://`: the *ring* provider, certificate files, the generated
//! self-signed certificate, and the client's verifier that remembers why a
//! certificate was rejected (so the error can say so plainly).

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use echo_core::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The ALPN protocol both sides require: wire v1 on QUIC streams.
pub const ALPN: &[u8] = b"echo/1";

/// The crypto provider every `quic://` config is built with: *ring*'s,
/// passed explicitly so nothing depends on a process-level default being
/// installed, with TLS 1.3 suites only, AES-128-GCM first (both sides list it
/// first, so it is what they agree on), and AES-GCM packet protection that
/// uses graviola's AVX-512 code for large packets where the CPU has it (see
/// the `seal` module).
///
/// Public so that other QUIC code can seal the same way (bench_quic's
/// `floor` and `proto` targets do).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: crate::seal::quic_suites(),
        ..rustls::crypto::ring::default_provider()
    })
}

fn tls_err(what: impl fmt::Display) -> Error {
    Error::Tls(what.to_string())
}

/// Reads every PEM certificate in `path` (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).map_err(|e| {
        tls_err(format_args!(
            "cannot read certificate file {}: {e}",
            path.display()
        ))
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| {
            tls_err(format_args!(
                "certificate file {} is not valid PEM: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(tls_err(format_args!(
            "certificate file {} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

/// Reads the private key (PKCS#8, PKCS#1 or SEC1 PEM) in `path`.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path)
        .map_err(|e| tls_err(format_args!("cannot read key file {}: {e}", path.display())))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        tls_err(format_args!(
            "key file {} holds no usable PEM private key: {e}",
            path.display()
        ))
    })
}

/// A freshly generated self-signed certificate and its key.
#[derive(Debug)]
pub(crate) struct SelfSigned {
    pub(crate) cert: CertificateDer<'static>,
    pub(crate) pem: String,
    pub(crate) key: PrivateKeyDer<'static>,
}

/// Generates a self-signed certificate (ECDSA P-256) for `names` (DNS names or IP
/// addresses).
pub(crate) fn self_signed(names: Vec<String>) -> Result<SelfSigned> {
    let ck = rcgen::generate_simple_self_signed(names.clone()).map_err(|e| {
        tls_err(format_args!(
            "cannot generate a self-signed certificate for {names:?}: {e}"
        ))
    })?;
    let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    Ok(SelfSigned {
        cert: ck.cert.der().clone(),
        pem: ck.cert.pem(),
        key,
    })
}

/// Writes `pem` to `path` atomically (a new temporary file beside it, then a
/// rename), so a reader never sees half a certificate and an existing symlink at
/// `path` is replaced rather than followed.
pub(crate) fn write_cert(path: &Path, pem: &str) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        tls_err(format_args!(
            "cert_out {} is not a file path",
            path.display()
        ))
    })?;
    let mut tmp = PathBuf::from(dir);
    tmp.push(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(pem.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        tls_err(format_args!(
            "cannot write the server certificate to {}: {e}",
            path.display()
        ))
    })
}

/// The server's rustls config: TLS 1.3 only, ALPN `echo/1`, no client certificates.
pub(crate) fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| tls_err(format_args!("the certificate and key do not fit: {e}")))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// Why the client's verifier rejected the server's certificate, if it did.
pub(crate) type Rejection = Arc<Mutex<Option<rustls::Error>>>;

/// The client's rustls config trusting exactly the certificates in `roots`, and
/// the slot where a verification failure is recorded.
pub(crate) fn client_config(
    roots: Vec<CertificateDer<'static>>,
    ca_path: &Path,
) -> Result<(rustls::ClientConfig, Rejection)> {
    let mut store = RootCertStore::empty();
    for (i, c) in roots.into_iter().enumerate() {
        store.add(c).map_err(|e| {
            tls_err(format_args!(
                "certificate {} in {} cannot be trusted as a root: {e}",
                i + 1,
                ca_path.display()
            ))
        })?;
    }
    let provider = crypto_provider();
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .build()
        .map_err(tls_err)?;
    let rejection = Rejection::default();
    let verifier = Arc::new(RecordingVerifier {
        inner,
        rejection: rejection.clone(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        // Full WebPKI verification against `roots`; the wrapper only records the
        // reason for a rejection.
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok((cfg, rejection))
}

/// WebPKI verification that also keeps the error it returned.
#[derive(Debug)]
struct RecordingVerifier {
    inner: Arc<WebPkiServerVerifier>,
    rejection: Rejection,
}

impl RecordingVerifier {
    fn record<T>(
        &self,
        r: std::result::Result<T, rustls::Error>,
    ) -> std::result::Result<T, rustls::Error> {
        if let Err(e) = &r {
            *self.rejection.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
        }
        r
    }
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.record(self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.record(self.inner.verify_tls12_signature(message, cert, dss))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.record(self.inner.verify_tls13_signature(message, cert, dss))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Explains a certificate rejection for a user: what was expected, what came,
/// and what to do.
pub(crate) fn explain_rejection(
    e: &rustls::Error,
    peer: &str,
    server_name: &str,
    ca_path: &Path,
) -> Error {
    use rustls::CertificateError as C;
    let ca = ca_path.display();
    let msg = match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => format!(
            "{peer}: the server's certificate is not trusted: it is neither in nor signed by a \
             certificate in ca={ca}. Use the certificate file this server printed at startup \
             (a server that generated a new self-signed certificate needs its new file)"
        ),
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => {
            format!(
                "{peer}: the server's certificate is not valid for server name {server_name:?} \
                 ({e}). Connect with ?server_name=NAME naming one of the certificate's names, \
                 or give the server that name (?names=... when it generates its certificate)"
            )
        }
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            format!("{peer}: the server's certificate has expired ({e})")
        }
        rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            format!("{peer}: the server's certificate is not valid yet ({e}); check the clocks")
        }
        _ => format!("{peer}: the server's certificate was rejected: {e} (trusted roots: {ca})"),
    };
    Error::Tls(msg)
}
