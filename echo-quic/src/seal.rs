//! QUIC packet protection for the AES-GCM suites.
//!
//! rustls's *ring* suites seal and open packets with *ring*'s AES-GCM, whose
//! fastest x86-64 code works on 256-bit vectors (VAES-AVX2). On CPUs with
//! AVX-512, VAES and VPCLMULQDQ, graviola's AES-GCM works on 512-bit vectors
//! and seals or opens a 64 KiB packet in about 70 % of *ring*'s time (3.8
//! against 5.4 µs here; BENCHMARKS.md, QUIC), and sealing and opening are
//! about 40 % of each side's CPU for large samples. So on such CPUs the
//! AES-GCM suites here keep everything of *ring*'s (the handshake and its
//! records, key derivation, header protection, packets under [`FAST_MIN`]
//! bytes) and hand larger packets to graviola. Both compute the same AES-GCM
//! (a test checks that they agree byte for byte): which one runs is a matter
//! of speed only, and a peer cannot tell. Packets that large travel on
//! loopback and jumbo-frame paths; on a 1500-byte MTU all of them are *ring*'s.

use rustls::SupportedCipherSuite;

/// Payloads at least this long are sealed and opened by graviola: below it,
/// graviola's handling of a tail that is not a whole number of 256-byte
/// blocks costs more than its wider vectors save (*ring* was faster at 1,452
/// and 2,300 bytes, graviola at every length from 4,096 on).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const FAST_MIN: usize = 4096;

/// AES-GCM's tag length.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const TAG_LEN: usize = 16;

/// The TLS 1.3 suites `quic://` offers, in order of preference: AES-128-GCM
/// (what QUIC's initial packets use anyway, 128-bit security, 10 AES rounds
/// per block instead of AES-256's 14), AES-256-GCM, ChaCha20-Poly1305. The
/// two AES-GCM suites protect large packets with graviola's code where the
/// CPU allows ([`fast_available`]).
pub(crate) fn quic_suites() -> Vec<SupportedCipherSuite> {
    use rustls::crypto::ring::cipher_suite as cs;
    let aes = [cs::TLS13_AES_128_GCM_SHA256, cs::TLS13_AES_256_GCM_SHA384];
    #[cfg(target_arch = "x86_64")]
    let aes = fast::suites(aes);
    vec![aes[0], aes[1], cs::TLS13_CHACHA20_POLY1305_SHA256]
}

/// Whether graviola runs on this CPU at all (it stops with a panic on one
/// without the features it requires of every x86-64 CPU, so it is never
/// called then): graviola's own check.
#[cfg(target_arch = "x86_64")]
fn graviola_runs() -> bool {
    graviola::util::is_cpu_supported()
}

/// Whether the AES-GCM suites use graviola for large packets on this CPU:
/// only if it runs and has what graviola's 512-bit code needs (without
/// that, *ring*'s code is as fast or faster).
#[cfg(target_arch = "x86_64")]
pub(crate) fn fast_available() -> bool {
    use std::sync::OnceLock;
    static HAVE: OnceLock<bool> = OnceLock::new();
    *HAVE.get_or_init(|| {
        graviola_runs()
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("vaes")
            && std::is_x86_feature_detected!("vpclmulqdq")
    })
}

/// Whether the AES-GCM suites use graviola: never off x86-64 (it is not
/// built there).
#[cfg(not(target_arch = "x86_64"))]
#[allow(dead_code)]
pub(crate) fn fast_available() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
mod fast {
    use std::sync::OnceLock;

    use ring::aead;
    use rustls::crypto::cipher::{AeadKey, Iv, Nonce};
    use rustls::quic::{self, Tag};
    use rustls::{CipherSuiteCommon, Error, SupportedCipherSuite, Tls13CipherSuite};

    use super::{fast_available, FAST_MIN, TAG_LEN};

    /// `aes` (*ring*'s AES-128-GCM and AES-256-GCM suites) with this
    /// module's packet protection, if the CPU has what it needs; else as
    /// they are.
    pub(super) fn suites(aes: [SupportedCipherSuite; 2]) -> [SupportedCipherSuite; 2] {
        if !fast_available() {
            return aes;
        }
        // Built once per process: rustls wants the suites, and a suite its
        // QUIC algorithm, for 'static.
        static SUITES: OnceLock<[SupportedCipherSuite; 2]> = OnceLock::new();
        *SUITES.get_or_init(|| aes.map(wrap))
    }

    /// `suite` with its QUIC packet keys from [`AesGcm`]; unchanged if it is
    /// not an AES-GCM TLS 1.3 suite with QUIC support.
    pub(super) fn wrap(suite: SupportedCipherSuite) -> SupportedCipherSuite {
        let SupportedCipherSuite::Tls13(t) = suite else {
            return suite;
        };
        let Some(ring_quic) = t.quic else {
            return suite;
        };
        let ring_alg = match t.common.suite {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => &aead::AES_128_GCM,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => &aead::AES_256_GCM,
            _ => return suite,
        };
        let alg: &'static AesGcm = Box::leak(Box::new(AesGcm {
            ring_quic,
            ring_alg,
        }));
        SupportedCipherSuite::Tls13(Box::leak(Box::new(Tls13CipherSuite {
            common: CipherSuiteCommon {
                suite: t.common.suite,
                hash_provider: t.common.hash_provider,
                confidentiality_limit: t.common.confidentiality_limit,
            },
            hkdf_provider: t.hkdf_provider,
            aead_alg: t.aead_alg,
            quic: Some(alg),
        })))
    }

    /// A suite's QUIC algorithm: *ring*'s, but with [`PacketKey`]s.
    struct AesGcm {
        /// rustls's *ring* algorithm for the suite: header protection, and
        /// the packet keys should a key not suit ours.
        ring_quic: &'static dyn quic::Algorithm,
        /// *ring*'s AEAD for the suite's packets under [`FAST_MIN`] bytes.
        ring_alg: &'static aead::Algorithm,
    }

    impl quic::Algorithm for AesGcm {
        fn packet_key(&self, key: AeadKey, iv: Iv) -> Box<dyn quic::PacketKey> {
            let bytes = key.as_ref();
            // rustls hands over keys of `aead_key_len()`: 16 or 32 bytes,
            // which *ring* and graviola both take. Were one refused, this
            // falls back to the key rustls would make without this module.
            let Ok(small) = aead::UnboundKey::new(self.ring_alg, bytes) else {
                return self.ring_quic.packet_key(key, iv);
            };
            Box::new(PacketKey {
                small: aead::LessSafeKey::new(small),
                large: graviola::aead::AesGcm::new(bytes),
                iv,
            })
        }

        fn header_protection_key(&self, key: AeadKey) -> Box<dyn quic::HeaderProtectionKey> {
            self.ring_quic.header_protection_key(key)
        }

        fn aead_key_len(&self) -> usize {
            self.ring_quic.aead_key_len()
        }

        fn fips(&self) -> bool {
            false
        }
    }

    /// One direction's packet key: *ring* for small packets, graviola for
    /// large ones, the same key and nonces for both.
    struct PacketKey {
        small: aead::LessSafeKey,
        large: graviola::aead::AesGcm,
        iv: Iv,
    }

    impl PacketKey {
        fn seal(&self, nonce: Nonce, header: &[u8], payload: &mut [u8]) -> Result<Tag, Error> {
            if payload.len() >= FAST_MIN {
                let mut tag = [0u8; TAG_LEN];
                self.large.encrypt(&nonce.0, header, payload, &mut tag);
                return Ok(Tag::from(&tag[..]));
            }
            let tag = self
                .small
                .seal_in_place_separate_tag(
                    aead::Nonce::assume_unique_for_key(nonce.0),
                    aead::Aad::from(header),
                    payload,
                )
                .map_err(|_| Error::EncryptError)?;
            Ok(Tag::from(tag.as_ref()))
        }

        fn open<'a>(
            &self,
            nonce: Nonce,
            header: &[u8],
            payload: &'a mut [u8],
        ) -> Result<&'a [u8], Error> {
            if payload.len() >= FAST_MIN + TAG_LEN {
                let (sealed, tag) = payload.split_at_mut(payload.len() - TAG_LEN);
                self.large
                    .decrypt(&nonce.0, header, sealed, tag)
                    .map_err(|_| Error::DecryptError)?;
                return Ok(sealed);
            }
            let plain = self
                .small
                .open_in_place(
                    aead::Nonce::assume_unique_for_key(nonce.0),
                    aead::Aad::from(header),
                    payload,
                )
                .map_err(|_| Error::DecryptError)?;
            Ok(plain)
        }
    }

    impl quic::PacketKey for PacketKey {
        fn encrypt_in_place(
            &self,
            packet_number: u64,
            header: &[u8],
            payload: &mut [u8],
        ) -> Result<Tag, Error> {
            self.seal(Nonce::new(&self.iv, packet_number), header, payload)
        }

        fn encrypt_in_place_for_path(
            &self,
            path_id: u32,
            packet_number: u64,
            header: &[u8],
            payload: &mut [u8],
        ) -> Result<Tag, Error> {
            let nonce = Nonce::for_path(path_id, &self.iv, packet_number);
            self.seal(nonce, header, payload)
        }

        fn decrypt_in_place<'a>(
            &self,
            packet_number: u64,
            header: &[u8],
            payload: &'a mut [u8],
        ) -> Result<&'a [u8], Error> {
            self.open(Nonce::new(&self.iv, packet_number), header, payload)
        }

        fn decrypt_in_place_for_path<'a>(
            &self,
            path_id: u32,
            packet_number: u64,
            header: &[u8],
            payload: &'a mut [u8],
        ) -> Result<&'a [u8], Error> {
            let nonce = Nonce::for_path(path_id, &self.iv, packet_number);
            self.open(nonce, header, payload)
        }

        fn tag_len(&self) -> usize {
            TAG_LEN
        }

        /// RFC 9001, section 6.6: packets one AES-GCM key may seal.
        fn confidentiality_limit(&self) -> u64 {
            1 << 23
        }

        /// RFC 9001, section 6.6: failed openings one AES-GCM key may see.
        fn integrity_limit(&self) -> u64 {
            1 << 52
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use proptest::prelude::*;
    use rustls::crypto::ring::cipher_suite as cs;
    use rustls::quic::{Keys, Version};
    use rustls::{Side, SupportedCipherSuite, Tls13CipherSuite};

    use super::*;

    /// A suite's TLS 1.3 half and QUIC algorithm.
    fn parts(
        s: SupportedCipherSuite,
    ) -> (
        &'static Tls13CipherSuite,
        &'static dyn rustls::quic::Algorithm,
    ) {
        let t = s.tls13().expect("a TLS 1.3 suite");
        (t, t.quic.expect("a suite with QUIC support"))
    }

    /// Initial keys derived for `cid` with `suite` (the same derivation
    /// whatever the packet protection).
    fn keys(suite: SupportedCipherSuite, cid: &[u8], side: Side) -> Keys {
        let (t, q) = parts(suite);
        Keys::initial(Version::V1, t, q, cid, side)
    }

    #[test]
    fn the_aes_suites_are_wrapped_exactly_when_the_cpu_has_avx512() {
        let ours = quic_suites();
        let ring = [
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ];
        assert_eq!(
            ours.iter().map(|s| s.suite()).collect::<Vec<_>>(),
            ring.iter().map(|s| s.suite()).collect::<Vec<_>>(),
            "the suites and their order"
        );
        for (o, r) in ours.iter().zip(&ring) {
            let same = std::ptr::eq(parts(*o).0, parts(*r).0);
            let aes = r.suite() != rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256;
            assert_eq!(same, !(aes && fast_available()), "{:?}", r.suite());
        }
        // What the packet test below compares *ring* with: graviola's
        // 512-bit code where the CPU has it (what the suites use), else its
        // 256-bit code (the wrapper's logic; the suites then use *ring*).
        eprintln!(
            "seal: graviola runs here: {}; the suites use its 512-bit AES-GCM: {}",
            super::graviola_runs(),
            fast_available()
        );
        // Built once: the same statics every time.
        assert!(std::ptr::eq(parts(quic_suites()[0]).0, parts(ours[0]).0));
    }

    /// Payload lengths around where the two codes meet and around 256-byte
    /// block multiples, plus anything up to a loopback packet.
    fn lengths() -> impl Strategy<Value = usize> {
        prop_oneof![
            0usize..64,
            (FAST_MIN - 300)..(FAST_MIN + 300),
            (1usize..260).prop_map(|k| k * 256),
            (1usize..260).prop_map(|k| k * 256 + 1),
            0usize..65_536,
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Sealing with either code gives the same bytes and tag as
        /// rustls's *ring* key; opening takes back what either sealed and
        /// refuses a packet with any bit changed.
        #[test]
        fn packets_match_ring_and_tampering_is_refused(
            aes256 in any::<bool>(),
            cid in proptest::collection::vec(any::<u8>(), 8..=20),
            pn in any::<u64>(),
            header in proptest::collection::vec(any::<u8>(), 1..64),
            len in lengths(),
            flip in any::<proptest::sample::Index>(),
        ) {
            if !super::graviola_runs() {
                // graviola would stop with a panic here: it must never run.
                prop_assert!(!fast_available());
                return Ok(());
            }
            let ring = if aes256 { cs::TLS13_AES_256_GCM_SHA384 } else { cs::TLS13_AES_128_GCM_SHA256 };
            let ours = fast::wrap(ring);
            prop_assert!(!std::ptr::eq(parts(ours).0, parts(ring).0), "wrapped");

            let plain: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            let (ring_seal, our_seal) = (keys(ring, &cid, Side::Client).local.packet, keys(ours, &cid, Side::Client).local.packet);
            prop_assert_eq!(our_seal.tag_len(), ring_seal.tag_len());
            prop_assert_eq!(our_seal.confidentiality_limit(), ring_seal.confidentiality_limit());
            prop_assert_eq!(our_seal.integrity_limit(), ring_seal.integrity_limit());
            let mut by_ring = plain.clone();
            let ring_tag = ring_seal.encrypt_in_place(pn, &header, &mut by_ring).expect("ring seals");
            let mut by_ours = plain.clone();
            let our_tag = our_seal.encrypt_in_place(pn, &header, &mut by_ours).expect("we seal");
            prop_assert_eq!(&by_ours, &by_ring);
            prop_assert_eq!(our_tag.as_ref(), ring_tag.as_ref());
            // Multipath nonces (not used by quinn 0.11, but part of the key).
            let path = (pn % 7) as u32;
            let (mut ring_path, mut our_path) = (plain.clone(), plain.clone());
            let ring_path_tag = ring_seal.encrypt_in_place_for_path(path, pn, &header, &mut ring_path).expect("ring seals");
            let our_path_tag = our_seal.encrypt_in_place_for_path(path, pn, &header, &mut our_path).expect("we seal");
            prop_assert_eq!(&our_path, &ring_path);
            prop_assert_eq!(our_path_tag.as_ref(), ring_path_tag.as_ref());
            ring_path.extend_from_slice(ring_path_tag.as_ref());
            let opened = keys(ours, &cid, Side::Server).remote.packet
                .decrypt_in_place_for_path(path, pn, &header, &mut ring_path).map(|p| p.to_vec());
            prop_assert_eq!(opened.as_deref(), Ok(&plain[..]));

            let open = keys(ours, &cid, Side::Server).remote.packet;
            let mut packet = by_ring.clone();
            packet.extend_from_slice(ring_tag.as_ref());
            let opened = open.decrypt_in_place(pn, &header, &mut packet.clone()).map(|p| p.to_vec());
            prop_assert_eq!(opened.as_deref(), Ok(&plain[..]));

            let mut good = packet.clone();
            prop_assert!(open.decrypt_in_place(pn.wrapping_add(1), &header, &mut good).is_err(), "wrong packet number");
            let at = flip.index(packet.len() + header.len());
            let mut header = header;
            if at < packet.len() {
                packet[at] ^= 0x10;
            } else {
                header[at - packet.len()] ^= 0x10;
            }
            prop_assert!(open.decrypt_in_place(pn, &header, &mut packet).is_err(), "bit {} changed", at);
        }
    }
}
