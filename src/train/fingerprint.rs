//! Stable digests of what a run or a cache depends on, written to disk (resume fingerprints, the
//! reference-log-prob cache key). SHA-256 over an unambiguous encoding (every piece
//! length-prefixed), so the value depends on the inputs alone — not on the Rust release, as
//! `std`'s `DefaultHasher` may.

use sha2::{Digest, Sha256};

/// Prefix of every digest of this format. Bump it when what goes into a digest changes, so that
/// files made by an older version are recognised as such instead of misread.
pub const FORMAT: &str = "v2";

pub struct Fingerprint(Sha256);

impl Fingerprint {
    /// A digest for one purpose (`"resume"`, `"ref-logps"`, …): the same inputs hashed for two
    /// purposes give two different values.
    pub fn new(purpose: &str) -> Self {
        let mut f = Fingerprint(Sha256::new());
        f.bytes(purpose.as_bytes());
        f
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.update((b.len() as u64).to_le_bytes());
        self.0.update(b);
        self
    }

    /// A JSON value as text (serde_json keeps struct fields in declaration order).
    pub fn json(&mut self, v: &serde_json::Value) -> &mut Self {
        self.bytes(v.to_string().as_bytes())
    }

    pub fn ids(&mut self, ids: &[u32]) -> &mut Self {
        self.0.update((ids.len() as u64).to_le_bytes());
        for id in ids {
            self.0.update(id.to_le_bytes());
        }
        self
    }

    pub fn floats(&mut self, xs: &[f32]) -> &mut Self {
        self.0.update((xs.len() as u64).to_le_bytes());
        for x in xs {
            self.0.update(x.to_bits().to_le_bytes());
        }
        self
    }

    /// `v2-` and 64 hex digits.
    pub fn finish(&mut self) -> String {
        let digest = std::mem::take(&mut self.0).finalize();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("{FORMAT}-{hex}")
    }
}

/// What a resumed run must share with the run that wrote its checkpoint: settings (as JSON) and
/// the token ids trained on.
pub fn resume_fingerprint<'a>(
    settings: &[serde_json::Value],
    token_lists: impl Iterator<Item = &'a [u32]>,
) -> String {
    let mut f = Fingerprint::new("resume");
    for s in settings {
        f.json(s);
    }
    for ids in token_lists {
        f.ids(ids);
    }
    f.finish()
}

/// Whether a digest read from disk has this version's format.
pub fn is_current(digest: &str) -> bool {
    digest
        .strip_prefix(FORMAT)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|hex| hex.len() == 64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_fixed_and_unambiguous() {
        // A fixed value (Python's hashlib over the same bytes): the digest must not change with
        // the toolchain.
        let d = Fingerprint::new("test").ids(&[1, 2, 3]).finish();
        assert_eq!(
            d,
            "v2-c7b8ee51d4c2078fd6a29c9416375bb039709c33b6ea3149f38a657c8d24f3cc"
        );
        assert!(is_current(&d));
        assert!(!is_current("0123456789abcdef"));
        // Piece boundaries matter: [1, 2] + [3] differs from [1] + [2, 3].
        let a = Fingerprint::new("t").ids(&[1, 2]).ids(&[3]).finish();
        let b = Fingerprint::new("t").ids(&[1]).ids(&[2, 3]).finish();
        assert_ne!(a, b);
        assert_ne!(
            Fingerprint::new("a").ids(&[1]).finish(),
            Fingerprint::new("b").ids(&[1]).finish()
        );
    }
}
