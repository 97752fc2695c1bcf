//! The registry: URL schemes mapped to transport and client factories.

use std::collections::BTreeMap;
use std::sync::Arc;

use url::Url;

use crate::ingress::Ingress;
use crate::spec::Spec;
use crate::transport::{Client, ClientFactory, ClientOptions, Transport, TransportFactory};
use crate::{Error, Result};

#[derive(Debug, Clone)]
struct Entry {
    transport: Arc<dyn TransportFactory>,
    client: Arc<dyn ClientFactory>,
}

/// Maps URL schemes (`tcp`, `unix`, `grpc`, `quic`, `mem`, or any a downstream crate
/// adds) to the factories that bind and connect them.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    entries: BTreeMap<String, Entry>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// A registry with the transports core ships: `mem`.
    pub fn with_core() -> Self {
        let mut r = Registry::new();
        crate::mem::register(&mut r).expect("empty registry has no mem scheme yet");
        r
    }

    /// Registers a scheme; registering one twice is an error.
    pub fn register(
        &mut self,
        scheme: &str,
        transport: Arc<dyn TransportFactory>,
        client: Arc<dyn ClientFactory>,
    ) -> Result<()> {
        let scheme = scheme.to_ascii_lowercase();
        if self.entries.contains_key(&scheme) {
            return Err(Error::DuplicateScheme(scheme));
        }
        self.entries.insert(scheme, Entry { transport, client });
        Ok(())
    }

    /// The registered schemes, sorted.
    pub fn schemes(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    /// True if `scheme` is registered.
    pub fn contains(&self, scheme: &str) -> bool {
        self.entries.contains_key(scheme)
    }

    fn entry(&self, url: &Url) -> Result<&Entry> {
        self.entries
            .get(url.scheme())
            .ok_or_else(|| Error::UnknownScheme {
                scheme: url.scheme().to_string(),
                available: self.schemes(),
            })
    }

    /// Binds a transport for `url` feeding `ingress`.
    pub async fn bind(&self, url: &str, ingress: Ingress) -> Result<Box<dyn Transport>> {
        let url = parse_url(url)?;
        self.entry(&url)?.transport.bind(&url, ingress).await
    }

    /// Connects a client to `url`, checking the server's spec against `spec`.
    pub async fn connect(
        &self,
        url: &str,
        spec: &Spec,
        options: &ClientOptions,
    ) -> Result<Box<dyn Client>> {
        options.validate()?;
        let url = parse_url(url)?;
        let entry = self.entry(&url)?;
        entry.client.connect(&url, spec, options).await
    }
}

/// Parses a URL with an error that names it.
pub fn parse_url(url: &str) -> Result<Url> {
    Url::parse(url).map_err(|e| Error::Url {
        url: url.to_string(),
        reason: format!("{e}; expected scheme://host:port or unix:///path"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_and_unknown_schemes() {
        let mut r = Registry::with_core();
        let e = crate::mem::register(&mut r).unwrap_err();
        assert!(matches!(e, Error::DuplicateScheme(ref s) if s == "mem"));
        let e = r
            .entry(&parse_url("carrier-pigeon://x:1").unwrap())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "no transport registered for scheme \"carrier-pigeon\"; registered: mem"
        );
        assert!(parse_url("no scheme").is_err());
    }
}
