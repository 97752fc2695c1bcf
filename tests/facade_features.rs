//! The facade's registry holds exactly the transports its Cargo features compiled
//! in: `mem` always, `tcp` + `unix` with `tcp`, `grpc` + `grpcs` with `grpc`,
//! `quic` with `quic`. `scripts/test-features.sh` runs this file once per feature
//! combination that matters (default, each transport alone, none, full).

use std::collections::BTreeSet;

fn expected() -> BTreeSet<&'static str> {
    let mut want = BTreeSet::from(["mem"]);
    if cfg!(feature = "tcp") {
        want.extend(["tcp", "unix"]);
    }
    if cfg!(feature = "grpc") {
        want.extend(["grpc", "grpcs"]);
    }
    if cfg!(feature = "quic") {
        want.insert("quic");
    }
    want
}

#[test]
fn registry_schemes_match_the_enabled_features() {
    let registry = echo::registry();
    let got: BTreeSet<String> = registry.schemes().into_iter().collect();
    let want: BTreeSet<String> = expected().into_iter().map(String::from).collect();
    assert_eq!(
        got,
        want,
        "features: tcp={} grpc={} quic={}",
        cfg!(feature = "tcp"),
        cfg!(feature = "grpc"),
        cfg!(feature = "quic")
    );
}

/// `full` is every transport.
#[cfg(feature = "full")]
#[test]
fn full_has_every_scheme() {
    assert_eq!(
        echo::registry().schemes(),
        ["grpc", "grpcs", "mem", "quic", "tcp", "unix"]
    );
}

#[test]
fn a_scheme_not_compiled_in_is_refused_naming_what_is_there() {
    let registry = echo::registry();
    for scheme in ["tcp", "grpc", "quic"] {
        if registry.contains(scheme) {
            continue;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let spec = echo::Spec::bytes(4).unwrap();
        let url = format!("{scheme}://127.0.0.1:1");
        let err = rt
            .block_on(registry.connect(&url, &spec, &echo::ClientOptions::default()))
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, echo::Error::UnknownScheme { .. })
                && msg.contains(&format!("{scheme:?}"))
                && msg.contains("mem"),
            "{msg}"
        );
    }
}

/// Each transport module is re-exported under its feature.
#[test]
fn transport_crates_are_reexported_per_feature() {
    #[cfg(feature = "tcp")]
    {
        let mut r = echo::Registry::new();
        echo::tcp::register(&mut r).unwrap();
        assert_eq!(r.schemes(), ["tcp", "unix"]);
    }
    #[cfg(feature = "grpc")]
    {
        let mut r = echo::Registry::new();
        echo::grpc::register(&mut r).unwrap();
        assert_eq!(r.schemes(), ["grpc", "grpcs"]);
    }
    #[cfg(feature = "quic")]
    {
        let mut r = echo::Registry::new();
        echo::quic::register(&mut r).unwrap();
        assert_eq!(r.schemes(), ["quic"]);
    }
}
