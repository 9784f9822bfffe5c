//! Deterministic randomness for the sandbox: a tiny PRNG, the per-(seed, owner, purpose, ordinal)
//! streams every synthetic value is drawn from, and Epic-looking FHIR ids.
//!
//! Everything here is pure and stateless apart from a [`SplitMix64`]'s own counter, so a value
//! can be regenerated at any time from the tuple it was derived from. [`mix`] is a bijection
//! ([`unmix`] inverts it), which the Binary ids of `documents.rs` rely on to stay decodable.

/// A tiny deterministic PRNG (splitmix64); good enough for synthetic data and fault rolls.
#[derive(Clone, Debug, Default)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// A value in `0..n` (0 when `n == 0`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// A value in `lo..=hi`.
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    /// A float in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// One element of a non-empty slice.
    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

const MIX_1: u64 = 0xBF58_476D_1CE4_E5B9;
const MIX_2: u64 = 0x94D0_49BB_1331_11EB;

/// The splitmix64 finaliser: a bijection on `u64` with good avalanche.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(MIX_1);
    z = (z ^ (z >> 27)).wrapping_mul(MIX_2);
    z ^ (z >> 31)
}

/// The inverse of [`mix`]: `unmix(mix(z)) == z`.
pub(crate) fn unmix(mut z: u64) -> u64 {
    z ^= (z >> 31) ^ (z >> 62);
    z = z.wrapping_mul(inverse(MIX_2));
    z ^= (z >> 27) ^ (z >> 54);
    z = z.wrapping_mul(inverse(MIX_1));
    z ^ (z >> 30) ^ (z >> 60)
}

/// The multiplicative inverse of an odd number modulo 2^64 (Newton's iteration).
const fn inverse(odd: u64) -> u64 {
    // Correct to 3 bits to start with (odd * odd ≡ 1 mod 8); each step doubles that.
    let mut x = odd;
    let mut i = 0;
    while i < 6 {
        x = x.wrapping_mul(2u64.wrapping_sub(odd.wrapping_mul(x)));
        i += 1;
    }
    x
}

/// A PRNG for one (seed, owner, purpose, ordinal) tuple; the owner is a patient index, or
/// [`SHARED`] for the catalogue of resources all patients share.
pub(crate) fn rng_for(seed: u64, owner: usize, tag: u64, n: u64) -> SplitMix64 {
    let mut h = mix(seed ^ 0xA076_1D64_78BD_642F);
    h = mix(h ^ owner as u64);
    h = mix(h ^ tag.wrapping_mul(0xE703_7ED1_A0B4_28DB));
    h = mix(h ^ n);
    SplitMix64::new(h)
}

/// The owner slot of the shared catalogue (never a patient index).
pub(crate) const SHARED: usize = usize::MAX;

/// Characters Epic-style FHIR ids are made of (all valid in a FHIR `id`).
pub(crate) const ID_CHARS: &[u8] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-.";

/// Length of every generated id: `e` + 40 opaque characters + `3`.
pub(crate) const ID_LEN: usize = 42;

/// An Epic-looking FHIR id: `e` + 40 opaque characters + `3`.
pub(crate) fn fhir_id(seed: u64, owner: usize, tag: u64, n: u64) -> String {
    let mut id = String::with_capacity(ID_LEN);
    id.push('e');
    push_id_chars(&mut id, &mut rng_for(seed, owner, tag ^ 0x1D, n), 40);
    id.push('3');
    id
}

/// Appends `count` id characters drawn from `rng`.
pub(crate) fn push_id_chars(id: &mut String, rng: &mut SplitMix64, count: usize) {
    let mut bits = 0u64;
    for i in 0..count {
        if i % 10 == 0 {
            bits = rng.next_u64();
        }
        id.push(ID_CHARS[(bits & 63) as usize] as char);
        bits >>= 6;
    }
}

/// The 6-bit value of an id character.
pub(crate) fn id_char_value(c: u8) -> Option<u64> {
    ID_CHARS.iter().position(|x| *x == c).map(|p| p as u64)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn unmix_inverts_mix() {
        let mut r = SplitMix64::new(7);
        for z in [0, 1, u64::MAX, 0x8000_0000_0000_0000] {
            assert_eq!(unmix(mix(z)), z);
        }
        for _ in 0..1000 {
            let z = r.next_u64();
            assert_eq!(unmix(mix(z)), z);
        }
    }

    #[test]
    fn ids_keep_their_shape() {
        // The same characters as before this module was split out of data.rs.
        let id = fhir_id(42, 0, 100, 0);
        assert_eq!(id.len(), ID_LEN);
        assert!(id.starts_with('e') && id.ends_with('3'));
        assert!(id.bytes().all(|c| id_char_value(c).is_some()));
    }
}
