//! superfly/macaroon's binary format, read: a token is a MessagePack array
//! `[nonce, location, caveats, tail]` (Go's array-encoded struct), the
//! nonce `[kid, rnd]` or `[kid, rnd, proof]`, the caveats a flat array of
//! `type, body` pairs, the tail the HMAC-SHA256 chain's last link.
//!
//! Go verifies the signature over its *re-encoding* of what it decoded.
//! Here the chain is computed over the bytes as they came: for a token Go
//! wrote (always in its canonical encoding) the two are the same, and a
//! token re-encoded some other way fails here instead of being read one
//! way and signed another.

use rmp::Marker;

/// Why a token's bytes are not a macaroon.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("the token ends early")]
    Truncated,
    #[error("expected {expected} at byte {at}")]
    Unexpected { expected: &'static str, at: usize },
    #[error("the nonce has {0} fields; superfly/macaroon writes 2 or 3")]
    NonceFields(u32),
    #[error("the caveat list has an odd length")]
    OddCaveats,
    #[error("{0} bytes follow the token")]
    Trailing(usize),
    #[error("values nest deeper than 32 levels")]
    TooDeep,
}

/// One caveat: its type number and its body, with the bytes the signature
/// chain covers (`[type, body]` as Go's `NewCaveatSet(c).MarshalMsgpack()`).
#[derive(Debug, Clone)]
pub struct RawCaveat<'a> {
    pub kind: u64,
    pub body: &'a [u8],
    /// `0x92`, then the type and body bytes as sent.
    pub signed: Vec<u8>,
}

/// A decoded token. Nothing in it is trusted before [`super::verify`].
#[derive(Debug, Clone)]
pub struct Macaroon<'a> {
    pub kid: &'a [u8],
    pub proof: bool,
    /// The nonce's bytes, the first link of the signature chain.
    pub nonce: &'a [u8],
    pub location: &'a [u8],
    pub caveats: Vec<RawCaveat<'a>>,
    pub tail: &'a [u8],
}

/// A cursor over the token's bytes.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.at.checked_add(n).ok_or(WireError::Truncated)?;
        let s = self.buf.get(self.at..end).ok_or(WireError::Truncated)?;
        self.at = end;
        Ok(s)
    }

    fn uint(&mut self, n: usize) -> Result<u64, WireError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    fn marker(&mut self) -> Result<Marker, WireError> {
        Ok(Marker::from_u8(self.take(1)?[0]))
    }

    fn unexpected(&self, expected: &'static str) -> WireError {
        WireError::Unexpected {
            expected,
            at: self.at.saturating_sub(1),
        }
    }

    fn array_len(&mut self) -> Result<u32, WireError> {
        match self.marker()? {
            Marker::FixArray(n) => Ok(u32::from(n)),
            Marker::Array16 => Ok(self.uint(2)? as u32),
            Marker::Array32 => Ok(self.uint(4)? as u32),
            _ => Err(self.unexpected("an array")),
        }
    }

    /// Bytes written as bin or str (Go's `[]byte` decodes from either).
    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let n = match self.marker()? {
            Marker::FixStr(n) => usize::from(n),
            Marker::Str8 | Marker::Bin8 => self.uint(1)? as usize,
            Marker::Str16 | Marker::Bin16 => self.uint(2)? as usize,
            Marker::Str32 | Marker::Bin32 => self.uint(4)? as usize,
            _ => return Err(self.unexpected("bytes")),
        };
        self.take(n)
    }

    fn str(&mut self) -> Result<&'a [u8], WireError> {
        let n = match self.marker()? {
            Marker::FixStr(n) => usize::from(n),
            Marker::Str8 => self.uint(1)? as usize,
            Marker::Str16 => self.uint(2)? as usize,
            Marker::Str32 => self.uint(4)? as usize,
            _ => return Err(self.unexpected("a string")),
        };
        self.take(n)
    }

    fn unsigned(&mut self) -> Result<u64, WireError> {
        match self.marker()? {
            Marker::FixPos(n) => Ok(u64::from(n)),
            Marker::U8 => self.uint(1),
            Marker::U16 => self.uint(2),
            Marker::U32 => self.uint(4),
            Marker::U64 => self.uint(8),
            _ => Err(self.unexpected("an unsigned integer")),
        }
    }

    /// Any integer that fits an i64, as Go decodes an `int64`.
    fn int(&mut self) -> Result<i64, WireError> {
        let m = self.marker()?;
        let v = match m {
            Marker::FixPos(n) => i64::from(n),
            Marker::FixNeg(n) => i64::from(n),
            Marker::U8 => self.uint(1)? as i64,
            Marker::U16 => self.uint(2)? as i64,
            Marker::U32 => self.uint(4)? as i64,
            Marker::U64 => i64::try_from(self.uint(8)?).map_err(|_| self.unexpected("an int64"))?,
            Marker::I8 => i64::from(self.uint(1)? as u8 as i8),
            Marker::I16 => i64::from(self.uint(2)? as u16 as i16),
            Marker::I32 => i64::from(self.uint(4)? as u32 as i32),
            Marker::I64 => self.uint(8)? as i64,
            _ => return Err(self.unexpected("an integer")),
        };
        Ok(v)
    }

    fn bool(&mut self) -> Result<bool, WireError> {
        match self.marker()? {
            Marker::True => Ok(true),
            Marker::False => Ok(false),
            _ => Err(self.unexpected("a boolean")),
        }
    }

    /// Skips one value of any type, returning its bytes.
    fn value(&mut self, depth: u8) -> Result<&'a [u8], WireError> {
        if depth > 32 {
            return Err(WireError::TooDeep);
        }
        let start = self.at;
        let (data, items) = match self.marker()? {
            Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => {
                (0, 0)
            }
            Marker::U8 | Marker::I8 => (1, 0),
            Marker::U16 | Marker::I16 => (2, 0),
            Marker::U32 | Marker::I32 | Marker::F32 => (4, 0),
            Marker::U64 | Marker::I64 | Marker::F64 => (8, 0),
            Marker::FixStr(n) => (usize::from(n), 0),
            Marker::Str8 | Marker::Bin8 => (self.uint(1)? as usize, 0),
            Marker::Str16 | Marker::Bin16 => (self.uint(2)? as usize, 0),
            Marker::Str32 | Marker::Bin32 => (self.uint(4)? as usize, 0),
            Marker::FixArray(n) => (0, u64::from(n)),
            Marker::Array16 => (0, self.uint(2)?),
            Marker::Array32 => (0, self.uint(4)?),
            Marker::FixMap(n) => (0, 2 * u64::from(n)),
            Marker::Map16 => (0, 2 * self.uint(2)?),
            Marker::Map32 => (0, 2 * self.uint(4)?),
            Marker::FixExt1 => (2, 0),
            Marker::FixExt2 => (3, 0),
            Marker::FixExt4 => (5, 0),
            Marker::FixExt8 => (9, 0),
            Marker::FixExt16 => (17, 0),
            Marker::Ext8 => (self.uint(1)? as usize + 1, 0),
            Marker::Ext16 => (self.uint(2)? as usize + 1, 0),
            Marker::Ext32 => (self.uint(4)? as usize + 1, 0),
            Marker::Reserved => return Err(self.unexpected("a MessagePack value")),
        };
        self.take(data)?;
        for _ in 0..items {
            self.value(depth + 1)?;
        }
        Ok(&self.buf[start..self.at])
    }
}

/// Reads one token (the bytes of one base64 part of the header).
pub fn decode(buf: &[u8]) -> Result<Macaroon<'_>, WireError> {
    let mut r = Reader { buf, at: 0 };
    if r.array_len()? != 4 {
        return Err(WireError::Unexpected {
            expected: "a 4-field token",
            at: 0,
        });
    }
    let nonce_start = r.at;
    let fields = r.array_len()?;
    if fields != 2 && fields != 3 {
        return Err(WireError::NonceFields(fields));
    }
    let kid = r.bytes()?;
    r.bytes()?;
    let proof = if fields == 3 { r.bool()? } else { false };
    let nonce = &buf[nonce_start..r.at];
    let location = r.str()?;
    let n = r.array_len()?;
    if n % 2 != 0 {
        return Err(WireError::OddCaveats);
    }
    let mut caveats = Vec::with_capacity((n / 2).min(64) as usize);
    for _ in 0..n / 2 {
        let type_start = r.at;
        let kind = r.unsigned()?;
        let body_start = r.at;
        let body = r.value(0)?;
        let mut signed = Vec::with_capacity(1 + r.at - type_start);
        signed.push(0x92);
        signed.extend_from_slice(&buf[type_start..r.at]);
        caveats.push(RawCaveat {
            kind,
            body: &buf[body_start..r.at],
            signed,
        });
        debug_assert_eq!(body.len(), r.at - body_start);
    }
    let tail = r.bytes()?;
    if r.at != buf.len() {
        return Err(WireError::Trailing(buf.len() - r.at));
    }
    Ok(Macaroon {
        kid,
        proof,
        nonce,
        location,
        caveats,
        tail,
    })
}

/// A caveat body that is a list of strings (the tokenizer's request
/// caveats: Go's `[]string`, `nil` for an empty one).
pub fn strings(body: &[u8]) -> Result<Vec<&[u8]>, WireError> {
    let mut r = Reader { buf: body, at: 0 };
    if body.first() == Some(&0xc0) && body.len() == 1 {
        return Ok(Vec::new());
    }
    let n = r.array_len()?;
    let mut out = Vec::with_capacity(n.min(64) as usize);
    for _ in 0..n {
        out.push(r.str()?);
    }
    if r.at != body.len() {
        return Err(WireError::Trailing(body.len() - r.at));
    }
    Ok(out)
}

/// A `ValidityWindow` body: `[not_before, not_after]` in Unix seconds.
pub fn window(body: &[u8]) -> Result<(i64, i64), WireError> {
    let mut r = Reader { buf: body, at: 0 };
    if r.array_len()? != 2 {
        return Err(WireError::Unexpected {
            expected: "a 2-field validity window",
            at: 0,
        });
    }
    let nb = r.int()?;
    let na = r.int()?;
    if r.at != body.len() {
        return Err(WireError::Trailing(body.len() - r.at));
    }
    Ok((nb, na))
}
