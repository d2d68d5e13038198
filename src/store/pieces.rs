//! SHA-256 with its state kept at every piece boundary, so that a large content fetched from a
//! bucket can be served piece by piece, each piece checked before any of its bytes is handed
//! out.
//!
//! SHA-256 reads its input in 64-byte blocks, and its whole state between two blocks is eight
//! 32-bit words. A [`PieceHasher`] is an ordinary SHA-256 that also writes down that state
//! after every [`PIECE`] bytes (a multiple of 64). The index keeps those states (32 bytes per
//! 8 MiB) beside the content's hash. A reader that received piece `i` runs SHA-256's
//! compression over it, starting from the state written down before it, and must arrive at the
//! state written down after it; the last piece must arrive, padded as SHA-256 pads, at the
//! content's hash itself. Bytes that pass are the content's bytes: other bytes arriving at the
//! same state would be a second preimage of SHA-256's compression function. The states come
//! from the index, never from the bucket.

use sha2::block_api::compress256;

use super::Hash;

/// Bytes per piece: the unit a reader of a content that is still arriving waits for.
pub const PIECE: u64 = 8 << 20;

/// SHA-256's initial state.
const IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// A running SHA-256 that writes down its state at every [`PIECE`] boundary.
#[derive(Clone)]
pub struct PieceHasher {
    state: [u32; 8],
    /// Bytes of an unfinished block.
    block: [u8; 64],
    /// Bytes hashed so far (those in `block` included).
    len: u64,
    /// The state after each whole piece, 32 bytes each.
    states: Vec<u8>,
}

impl Default for PieceHasher {
    fn default() -> Self {
        PieceHasher::new()
    }
}

impl PieceHasher {
    pub fn new() -> PieceHasher {
        PieceHasher {
            state: IV,
            block: [0; 64],
            len: 0,
            states: Vec::new(),
        }
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            // Never past the end of the current piece, so that its state can be written down.
            let to_boundary = PIECE - self.len % PIECE;
            let take = (data.len() as u64).min(to_boundary) as usize;
            self.absorb(&data[..take]);
            data = &data[take..];
            if self.len.is_multiple_of(PIECE) {
                self.states.extend_from_slice(&words_to_bytes(&self.state));
            }
        }
    }

    fn absorb(&mut self, mut data: &[u8]) {
        let used = (self.len % 64) as usize;
        self.len += data.len() as u64;
        if used > 0 {
            let n = data.len().min(64 - used);
            self.block[used..used + n].copy_from_slice(&data[..n]);
            data = &data[n..];
            if used + n < 64 {
                return;
            }
            compress256(&mut self.state, &[self.block]);
        }
        let (blocks, rest) = data.as_chunks::<64>();
        if !blocks.is_empty() {
            compress256(&mut self.state, blocks);
        }
        self.block[..rest.len()].copy_from_slice(rest);
    }

    /// The hash of everything added, and the states after each whole piece (a content of
    /// exactly `k` pieces has `k` states; the last one is not needed to check it).
    pub fn finish(&self) -> (Hash, Vec<u8>) {
        (
            finalize(self.state, &self.block, self.len),
            self.states.clone(),
        )
    }

    /// The hash of everything added.
    pub fn hash(&self) -> Hash {
        finalize(self.state, &self.block, self.len)
    }

    /// The states written down so far.
    pub fn states(&self) -> &[u8] {
        &self.states
    }
}

/// SHA-256's padding and output, from `state` after the whole blocks of a message of `len`
/// bytes whose last `len % 64` bytes are at the start of `block`.
fn finalize(mut state: [u32; 8], block: &[u8; 64], len: u64) -> Hash {
    let used = (len % 64) as usize;
    let mut last = [0u8; 128];
    last[..used].copy_from_slice(&block[..used]);
    last[used] = 0x80;
    let end = if used < 56 { 64 } else { 128 };
    last[end - 8..end].copy_from_slice(&(len.wrapping_mul(8)).to_be_bytes());
    let (blocks, _) = last[..end].as_chunks::<64>();
    compress256(&mut state, blocks);
    Hash(words_to_bytes(&state))
}

fn words_to_bytes(state: &[u32; 8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (chunk, w) in out.chunks_exact_mut(4).zip(state) {
        chunk.copy_from_slice(&w.to_be_bytes());
    }
    out
}

/// Checks a content of `size` bytes and hash `hash` piece by piece as it arrives in order,
/// against the states the index keeps for it: [`PieceCheck::feed`] returns how many bytes
/// from the start are now known good.
pub struct PieceCheck {
    hasher: PieceHasher,
    expected: Vec<u8>,
    size: u64,
    hash: Hash,
}

impl PieceCheck {
    /// `None` when `states` cannot be the states of such a content (then it is checked whole).
    pub fn new(hash: Hash, size: u64, states: Vec<u8>) -> Option<PieceCheck> {
        let whole_pieces = size / PIECE;
        let needed = if size.is_multiple_of(PIECE) {
            whole_pieces.saturating_sub(1)
        } else {
            whole_pieces
        };
        (states.len() as u64 >= needed * 32).then_some(PieceCheck {
            hasher: PieceHasher::new(),
            expected: states,
            size,
            hash,
        })
    }

    /// Adds the next bytes (in order). `Ok(good)`: the first `good` bytes are the content's;
    /// `Err(offset)`: the piece that starts at `offset` is not.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<u64, u64> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let at = self.hasher.len();
            if at >= self.size {
                return Err(at - at % PIECE); // more bytes than the content has
            }
            let to_boundary = (PIECE - at % PIECE).min(self.size - at);
            let take = (rest.len() as u64).min(to_boundary) as usize;
            self.hasher.update(&rest[..take]);
            rest = &rest[take..];
            let now = self.hasher.len();
            let start = (now - 1) / PIECE * PIECE;
            if now == self.size {
                if self.hasher.hash() != self.hash {
                    return Err(start);
                }
            } else if now.is_multiple_of(PIECE) {
                let i = (now / PIECE - 1) as usize;
                if self.hasher.states()[i * 32..(i + 1) * 32] != self.expected[i * 32..(i + 1) * 32]
                {
                    return Err(start);
                }
            }
        }
        Ok(self.good())
    }

    /// The size of the content checked.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How many bytes were fed so far.
    pub fn fed(&self) -> u64 {
        self.hasher.len()
    }

    /// How many bytes from the start are known good.
    pub fn good(&self) -> u64 {
        let len = self.hasher.len();
        if len == self.size && self.hasher.hash() == self.hash {
            len
        } else {
            len / PIECE * PIECE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + i / 977) as u8).collect()
    }

    #[test]
    fn hashes_as_sha256_whatever_the_cuts() {
        for n in [
            0,
            1,
            55,
            56,
            63,
            64,
            65,
            119,
            120,
            128,
            1000,
            PIECE as usize + 77,
        ] {
            let d = data(n);
            for step in [1usize, 63, 64, 4096, 1 << 20] {
                if n > 100_000 && step < 4096 {
                    continue;
                }
                let mut h = PieceHasher::new();
                for c in d.chunks(step) {
                    h.update(c);
                }
                assert_eq!(h.hash(), Hash::of(&d), "n {n} step {step}");
            }
        }
    }

    #[test]
    fn a_state_per_whole_piece() {
        let d = data(2 * PIECE as usize + 5);
        let mut h = PieceHasher::new();
        h.update(&d);
        let (hash, states) = h.finish();
        assert_eq!(hash, Hash::of(&d));
        assert_eq!(states.len(), 64);
        let mut exact = PieceHasher::new();
        exact.update(&d[..PIECE as usize]);
        assert_eq!(exact.states(), &states[..32]);
    }

    #[test]
    fn pieces_are_checked_as_they_arrive() {
        let size = 3 * PIECE as usize + 1000;
        let d = data(size);
        let mut h = PieceHasher::new();
        h.update(&d);
        let (hash, states) = h.finish();

        let mut check = PieceCheck::new(hash, size as u64, states.clone()).unwrap();
        let mut good = 0;
        for c in d.chunks(3 << 20) {
            good = check.feed(c).unwrap();
            assert!(good.is_multiple_of(PIECE) || good == size as u64);
        }
        assert_eq!(good, size as u64);

        // A changed byte in the third piece: the first two are good, the third is not.
        let mut bad = d.clone();
        bad[2 * PIECE as usize + 10] ^= 1;
        let mut check = PieceCheck::new(hash, size as u64, states.clone()).unwrap();
        assert_eq!(check.feed(&bad[..2 * PIECE as usize]), Ok(2 * PIECE));
        assert_eq!(check.feed(&bad[2 * PIECE as usize..]), Err(2 * PIECE));

        // A changed byte in the last, short piece: only the hash can tell.
        let mut bad = d.clone();
        bad[size - 1] ^= 1;
        let mut check = PieceCheck::new(hash, size as u64, states.clone()).unwrap();
        assert_eq!(check.feed(&bad), Err(3 * PIECE));
        assert_eq!(check.good(), 3 * PIECE);

        // Too few states for the size: not checked piece by piece.
        assert!(PieceCheck::new(hash, size as u64, states[..64].to_vec()).is_none());
        // A content of exactly two pieces needs one state.
        let two = data(2 * PIECE as usize);
        let mut h = PieceHasher::new();
        h.update(&two);
        let (hash2, states2) = h.finish();
        let mut check = PieceCheck::new(hash2, two.len() as u64, states2[..32].to_vec()).unwrap();
        assert_eq!(check.feed(&two), Ok(2 * PIECE));
    }
}
