//! URL options of `grpc://` and `grpcs://`, checked up front with clear errors.

use std::path::PathBuf;

use echo_core::{Error, Result, Url};

/// Default HTTP/2 receive window per stream on the server, in bytes (raised to
/// hold two full messages when messages are larger).
pub const DEFAULT_STREAM_WINDOW: u32 = 4 << 20;

/// Default largest HTTP/2 DATA frame the server accepts, in bytes (HTTP/2's own
/// default is 16 KiB).
pub const DEFAULT_MAX_FRAME: u32 = 256 << 10;

/// HTTP/2's largest window (2^31 - 1).
const MAX_WINDOW: u32 = (1 << 31) - 1;
/// HTTP/2's smallest initial window (its default, 65535).
const MIN_WINDOW: u32 = 65_535;
/// HTTP/2's frame size bounds.
const MIN_FRAME: u32 = 16_384;
const MAX_FRAME: u32 = (1 << 24) - 1;

const SERVER_KEYS: &[&str] = &[
    "cert",
    "key",
    "token",
    "token_file",
    "max_payloads",
    "window",
    "conn_window",
    "frame",
];
const CLIENT_KEYS: &[&str] = &["ca", "pin", "domain", "token", "token_file", "max_payloads"];

fn url_error(url: &Url, reason: impl Into<String>) -> Error {
    Error::Url {
        url: redacted(url),
        reason: reason.into(),
    }
}

/// The URL as text with a `token` value replaced, for errors and logs.
pub(crate) fn redacted(url: &Url) -> String {
    if !url.query_pairs().any(|(k, _)| k == "token") {
        return url.to_string();
    }
    let mut u = url.clone();
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "token" {
                "***".into()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    u.query_pairs_mut().clear().extend_pairs(pairs);
    u.to_string()
}

fn check_keys(url: &Url, known: &[&str]) -> Result<()> {
    for (k, _) in url.query_pairs() {
        if !known.contains(&k.as_ref()) {
            return Err(url_error(
                url,
                format!(
                    "unknown query parameter {k:?}; expected one of {}",
                    known.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

fn string_param(url: &Url, key: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

fn path_param(url: &Url, key: &str) -> Result<Option<PathBuf>> {
    match string_param(url, key) {
        None => Ok(None),
        Some(p) if p.is_empty() => Err(url_error(
            url,
            format!("query parameter {key} is empty; expected a file path"),
        )),
        Some(p) => Ok(Some(PathBuf::from(p))),
    }
}

/// The bearer token from `token` or `token_file` (not both).
fn token_param(url: &Url) -> Result<Option<String>> {
    let inline = string_param(url, "token");
    let file = path_param(url, "token_file")?;
    let token = match (inline, file) {
        (Some(_), Some(_)) => {
            return Err(url_error(
                url,
                "both token and token_file are given; expected one of them",
            ))
        }
        (Some(t), None) => t,
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                Error::Config(format!("cannot read token_file {}: {e}", path.display()))
            })?;
            text.trim().to_string()
        }
        (None, None) => return Ok(None),
    };
    if token.is_empty() {
        return Err(url_error(
            url,
            "the token is empty; expected at least one character",
        ));
    }
    if let Some(c) = token.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(url_error(
            url,
            format!(
                "the token contains {c:?}; expected visible ASCII characters only (it travels in an HTTP header)"
            ),
        ));
    }
    Ok(Some(token))
}

/// A number parameter (errors redact the token, unlike core's `query_param`).
fn number_param(url: &Url, key: &str) -> Result<Option<u64>> {
    match string_param(url, key) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|e| {
            url_error(
                url,
                format!("query parameter {key}={v:?}: {e}; expected a whole number"),
            )
        }),
    }
}

fn bounded_u32(url: &Url, key: &str, min: u32, max: u32) -> Result<Option<u32>> {
    let Some(v) = number_param(url, key)? else {
        return Ok(None);
    };
    if v < u64::from(min) || v > u64::from(max) {
        return Err(url_error(
            url,
            format!("{key}={v} is out of range; expected {min} to {max} bytes"),
        ));
    }
    Ok(Some(v as u32))
}

fn max_payloads_param(url: &Url) -> Result<Option<usize>> {
    match number_param(url, "max_payloads")? {
        None => Ok(None),
        Some(0) => Err(url_error(url, "max_payloads=0; expected at least 1")),
        Some(v) => Ok(Some(usize::try_from(v).unwrap_or(usize::MAX))),
    }
}

fn is_tls(url: &Url) -> Result<bool> {
    match url.scheme() {
        "grpc" => Ok(false),
        "grpcs" => Ok(true),
        other => Err(url_error(
            url,
            format!("scheme {other:?} is not served by echo-grpc; expected grpc or grpcs"),
        )),
    }
}

/// Certificate and key files of a `grpcs://` server.
#[derive(Debug, Clone)]
pub(crate) struct ServerTlsFiles {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

/// A server URL's options.
#[derive(Debug, Clone)]
pub(crate) struct ServerOptions {
    pub(crate) tls: Option<ServerTlsFiles>,
    pub(crate) token: Option<String>,
    pub(crate) max_payloads: Option<usize>,
    pub(crate) window: Option<u32>,
    pub(crate) conn_window: Option<u32>,
    pub(crate) frame: u32,
}

impl ServerOptions {
    pub(crate) fn parse(url: &Url) -> Result<ServerOptions> {
        check_keys(url, SERVER_KEYS)?;
        let tls = is_tls(url)?;
        let cert = path_param(url, "cert")?;
        let key = path_param(url, "key")?;
        let tls =
            match (tls, cert, key) {
                (true, Some(cert), Some(key)) => Some(ServerTlsFiles { cert, key }),
                (true, _, _) => return Err(url_error(
                    url,
                    "grpcs:// needs cert=PATH and key=PATH (PEM certificate chain and private key)",
                )),
                (false, None, None) => None,
                (false, _, _) => {
                    return Err(url_error(
                        url,
                        "cert and key are for grpcs://; grpc:// is plaintext",
                    ))
                }
            };
        Ok(ServerOptions {
            tls,
            token: token_param(url)?,
            max_payloads: max_payloads_param(url)?,
            window: bounded_u32(url, "window", MIN_WINDOW, MAX_WINDOW)?,
            conn_window: bounded_u32(url, "conn_window", MIN_WINDOW, MAX_WINDOW)?,
            frame: bounded_u32(url, "frame", MIN_FRAME, MAX_FRAME)?.unwrap_or(DEFAULT_MAX_FRAME),
        })
    }

    /// The stream window for messages of `message_bytes`: the option, or the default
    /// raised to hold two messages.
    pub(crate) fn stream_window(&self, message_bytes: usize) -> u32 {
        self.window.unwrap_or_else(|| {
            let two = message_bytes.saturating_mul(2).min(MAX_WINDOW as usize) as u32;
            DEFAULT_STREAM_WINDOW.max(two)
        })
    }

    /// The connection window: the option, or twice the stream window.
    pub(crate) fn connection_window(&self, stream_window: u32) -> u32 {
        self.conn_window
            .unwrap_or_else(|| stream_window.saturating_mul(2).min(MAX_WINDOW))
    }
}

/// How a `grpcs://` client checks the server's certificate.
#[derive(Debug, Clone)]
pub(crate) struct ClientTls {
    pub(crate) ca: Option<PathBuf>,
    pub(crate) pin: Option<PathBuf>,
    pub(crate) domain: Option<String>,
}

/// A client URL's options.
#[derive(Debug, Clone)]
pub(crate) struct ClientUrlOptions {
    pub(crate) tls: Option<ClientTls>,
    pub(crate) token: Option<String>,
    pub(crate) max_payloads: Option<usize>,
}

impl ClientUrlOptions {
    pub(crate) fn parse(url: &Url) -> Result<ClientUrlOptions> {
        check_keys(url, CLIENT_KEYS)?;
        let tls = is_tls(url)?;
        let ca = path_param(url, "ca")?;
        let pin = path_param(url, "pin")?;
        let domain = string_param(url, "domain");
        if let Some(d) = &domain {
            if d.is_empty() {
                return Err(url_error(url, "domain is empty; expected a DNS name"));
            }
        }
        let tls = if tls {
            if ca.is_some() && pin.is_some() {
                return Err(url_error(
                    url,
                    "both ca and pin are given; expected one way to check the server's certificate",
                ));
            }
            if ca.is_none() && pin.is_none() {
                return Err(url_error(
                    url,
                    "grpcs:// needs ca=PATH (trusted certificates, PEM) or pin=PATH (the server's certificate, PEM)",
                ));
            }
            Some(ClientTls { ca, pin, domain })
        } else {
            if ca.is_some() || pin.is_some() || domain.is_some() {
                return Err(url_error(
                    url,
                    "ca, pin and domain are for grpcs://; grpc:// is plaintext",
                ));
            }
            None
        };
        Ok(ClientUrlOptions {
            tls,
            token: token_param(url)?,
            max_payloads: max_payloads_param(url)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn server_options_are_checked() {
        let o = ServerOptions::parse(&url("grpc://127.0.0.1:0?token=abc&max_payloads=7")).unwrap();
        assert!(o.tls.is_none());
        assert_eq!(o.token.as_deref(), Some("abc"));
        assert_eq!(o.max_payloads, Some(7));
        assert_eq!(o.frame, DEFAULT_MAX_FRAME);
        assert_eq!(o.stream_window(1000), DEFAULT_STREAM_WINDOW);
        assert_eq!(o.stream_window(10 << 20), 20 << 20);

        let e = ServerOptions::parse(&url("grpcs://127.0.0.1:0")).unwrap_err();
        assert!(
            e.to_string().contains("needs cert=PATH and key=PATH"),
            "{e}"
        );
        let e = ServerOptions::parse(&url("grpc://127.0.0.1:0?cert=a&key=b")).unwrap_err();
        assert!(e.to_string().contains("grpc:// is plaintext"), "{e}");
        let e = ServerOptions::parse(&url("grpc://127.0.0.1:0?tokne=x")).unwrap_err();
        assert!(
            e.to_string().contains("unknown query parameter \"tokne\""),
            "{e}"
        );
        let e = ServerOptions::parse(&url("grpc://127.0.0.1:0?max_payloads=0")).unwrap_err();
        assert!(e.to_string().contains("expected at least 1"), "{e}");
        let e = ServerOptions::parse(&url("grpc://127.0.0.1:0?frame=100")).unwrap_err();
        assert!(e.to_string().contains("expected 16384 to 16777215"), "{e}");
        let e = ServerOptions::parse(&url("grpc://127.0.0.1:0?token=a%20b")).unwrap_err();
        assert!(e.to_string().contains("visible ASCII"), "{e}");
        assert!(
            !e.to_string().contains("a b"),
            "the token leaks into errors: {e}"
        );
    }

    #[test]
    fn client_options_are_checked() {
        let o = ClientUrlOptions::parse(&url("grpcs://h:1?ca=/x.pem&domain=localhost")).unwrap();
        let tls = o.tls.unwrap();
        assert_eq!(tls.ca, Some(PathBuf::from("/x.pem")));
        assert_eq!(tls.domain.as_deref(), Some("localhost"));
        let e = ClientUrlOptions::parse(&url("grpcs://h:1")).unwrap_err();
        assert!(e.to_string().contains("needs ca=PATH"), "{e}");
        let e = ClientUrlOptions::parse(&url("grpcs://h:1?ca=a&pin=b")).unwrap_err();
        assert!(e.to_string().contains("both ca and pin"), "{e}");
        let e = ClientUrlOptions::parse(&url("grpc://h:1?ca=a")).unwrap_err();
        assert!(e.to_string().contains("grpc:// is plaintext"), "{e}");
        let e = ClientUrlOptions::parse(&url("grpc://h:1?token=x&token_file=y")).unwrap_err();
        assert!(e.to_string().contains("both token and token_file"), "{e}");
    }

    #[test]
    fn tokens_are_redacted() {
        let u = url("grpc://h:1?token=secret&max_payloads=3");
        let r = redacted(&u);
        assert!(!r.contains("secret") && r.contains("max_payloads=3"), "{r}");
    }
}
