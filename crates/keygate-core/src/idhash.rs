//! [`KeyIdHashBuilder`]: a fast keyed hash for maps keyed by verified key ids.

use std::hash::{BuildHasher, Hasher};

/// Hashes [`KeyId`](crate::KeyId)s for maps on the request path (the verifier's cache, the
/// quota layer's counters): a multiply-fold hash keyed by a random per-map seed, several
/// times cheaper than the default SipHash on a 12-byte id.
///
/// Use it only for maps whose keys are ids of records read from the store (random, chosen
/// by keygate at issue time), never for values a caller chooses (unknown ids, addresses):
/// flooding resistance then does not depend on the hash, since a caller cannot choose what
/// lands in the map, only what is looked up.
///
/// ```
/// use std::collections::HashMap;
/// use keygate_core::{KeyId, KeyIdHashBuilder};
///
/// let mut m: HashMap<KeyId, u32, KeyIdHashBuilder> = HashMap::with_hasher(KeyIdHashBuilder::new());
/// m.insert(KeyId::parse("AbCdEfGhIjKl").unwrap(), 1);
/// assert_eq!(m[&KeyId::parse("AbCdEfGhIjKl").unwrap()], 1);
/// ```
#[derive(Clone, Debug)]
pub struct KeyIdHashBuilder {
    seed: u64,
}

impl KeyIdHashBuilder {
    /// A builder with a fresh random seed (taken from std's randomly keyed SipHash).
    pub fn new() -> Self {
        let seed = std::collections::hash_map::RandomState::new().hash_one(0x6b67_u64);
        KeyIdHashBuilder { seed }
    }
}

impl Default for KeyIdHashBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BuildHasher for KeyIdHashBuilder {
    type Hasher = KeyIdHasher;
    fn build_hasher(&self) -> KeyIdHasher {
        KeyIdHasher(self.seed)
    }
}

/// The [`Hasher`] of [`KeyIdHashBuilder`].
#[derive(Debug)]
pub struct KeyIdHasher(u64);

/// 2^64 divided by the golden ratio, odd.
const ID_HASH_MUL: u64 = 0x9e37_79b9_7f4a_7c15;

/// Multiplies to 128 bits and folds the halves together: every input bit reaches the
/// whole output.
fn fold_mul(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

impl KeyIdHasher {
    fn mix(&mut self, word: u64) {
        self.0 = fold_mul(self.0 ^ word, ID_HASH_MUL);
    }
}

impl Hasher for KeyIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.mix(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 56));
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }

    fn finish(&self) -> u64 {
        fold_mul(self.0, ID_HASH_MUL.rotate_left(29))
    }
}

#[cfg(test)]
mod id_hash_tests {
    use std::collections::HashSet;
    use std::hash::BuildHasher;

    use super::KeyIdHashBuilder;
    use crate::key::KeyId;

    #[test]
    fn ids_spread_over_buckets_and_shards() {
        let b = KeyIdHashBuilder::new();
        let ids: Vec<KeyId> = (0..10_000).map(|_| KeyId::generate().unwrap()).collect();
        let hashes: HashSet<u64> = ids.iter().map(|id| b.hash_one(id)).collect();
        assert_eq!(hashes.len(), ids.len());
        assert_eq!(b.hash_one(ids[0]), b.hash_one(ids[0]));
        // Low bits pick hashbrown's bucket, high bits dashmap's shard and hashbrown's tag:
        // with 10,000 random ids over 64 slots (about 156 each) none may stand out.
        for shift in [0, 57] {
            let mut slots = [0u32; 64];
            for h in &hashes {
                slots[((h >> shift) & 63) as usize] += 1;
            }
            let (min, max) = (slots.iter().min().unwrap(), slots.iter().max().unwrap());
            assert!(*min > 90 && *max < 230, "shift {shift}: {min}..{max}");
        }
        // Ids differing in one character hash apart.
        let a = KeyId::parse("aaaaaaaaaaaa").unwrap();
        let c = KeyId::parse("aaaaaaaaaaab").unwrap();
        assert_ne!(b.hash_one(a), b.hash_one(c));
    }

    #[test]
    fn hashes_depend_on_every_byte_and_the_seed() {
        let b = KeyIdHashBuilder::new();
        let base = [7u8; 16];
        let h0 = b.hash_one(base);
        for i in 0..16 {
            let mut other = base;
            other[i] ^= 1;
            assert_ne!(b.hash_one(other), h0, "byte {i}");
        }
        assert_eq!(b.hash_one(base), h0);
        assert_ne!(
            KeyIdHashBuilder { seed: 1 }.hash_one(base),
            KeyIdHashBuilder { seed: 2 }.hash_one(base)
        );
        // Lengths count: a shorter slice of zeros is not a longer one.
        assert_ne!(b.hash_one(&[0u8; 3][..]), b.hash_one(&[0u8; 4][..]));
    }
}
