//! Bounds the work of decoding a Parquet file's Thrift structures (its footer and page headers)
//! before the `parquet` crate decodes them.
//!
//! The crate skips a Thrift field it does not know by walking it, and takes each boolean in a
//! list as zero bytes (the compact protocol gives it one). A list's header states its length, so a
//! field of a few bytes can claim 2³¹ booleans: a 371-byte file found by fuzzing kept the decoder
//! busy for seconds, and a longer one would for hours (parquet 60.1 and 60.2). This walks the
//! same bytes the way the crate will and refuses a file whose structures claim more elements than
//! its bytes could hold; a well-formed file never does, since every element of a valid structure
//! takes at least one byte. Anything else malformed is left for the crate to report.

use anyhow::{bail, Result};
use std::io::{BufReader, Read, Seek, SeekFrom};

use ::parquet::basic::{Compression, Type as PhysicalType};
use ::parquet::file::metadata::{ColumnChunkMetaData, ParquetMetaData};

// The compact protocol's types (the low four bits of a field's or a list's header).
const BOOL_TRUE: u8 = 1;
const BOOL_FALSE: u8 = 2;
const BYTE: u8 = 3;
const I16: u8 = 4;
const I32: u8 = 5;
const I64: u8 = 6;
const DOUBLE: u8 = 7;
const BINARY: u8 = 8;
const LIST: u8 = 9;
const SET: u8 = 10;
const MAP: u8 = 11;
const STRUCT: u8 = 12;
const UUID: u8 = 13;

/// Deeper than this the crate refuses to skip (it stops 64 levels below the structures it knows).
const MAX_DEPTH: usize = 80;

// Fields of a `PageHeader`: its type, the page's sizes, and a dictionary page's value count.
const PAGE_TYPE: &[i16] = &[1];
const UNCOMPRESSED_PAGE_SIZE: &[i16] = &[2];
const COMPRESSED_PAGE_SIZE: &[i16] = &[3];
const DICTIONARY_NUM_VALUES: &[i16] = &[7, 1];
const DICTIONARY_PAGE: i32 = 2;

/// Why a walk stopped early.
#[derive(Debug, PartialEq)]
enum Stop {
    /// Malformed in a way the crate reports itself.
    Malformed,
    /// A list or map claims `claimed` elements, more than the bytes could hold.
    TooMany { claimed: u64 },
}

/// Walks Thrift compact-protocol values, counting the elements visited against `budget` and
/// keeping the integers found at the field paths of `wanted` (field ids from the outermost struct).
struct Walker<R> {
    input: R,
    consumed: u64,
    budget: u64,
    path: Vec<i16>,
    wanted: Vec<(&'static [i16], Option<i32>)>,
}

impl<R: Read> Walker<R> {
    fn new(input: R, budget: u64) -> Self {
        Walker {
            input,
            consumed: 0,
            budget,
            path: vec![],
            wanted: vec![],
        }
    }

    /// The integer at `path`, if the walk met one there.
    fn found(&self, path: &[i16]) -> Option<i32> {
        self.wanted
            .iter()
            .find(|(p, _)| *p == path)
            .and_then(|(_, n)| *n)
    }

    fn byte(&mut self) -> Result<u8, Stop> {
        let mut b = [0u8];
        self.input.read_exact(&mut b).map_err(|_| Stop::Malformed)?;
        self.consumed += 1;
        Ok(b[0])
    }

    /// An unsigned varint, read as the crate reads it (bits past 64 wrap).
    fn varint(&mut self) -> Result<u64, Stop> {
        let (mut value, mut shift) = (0u64, 0u32);
        loop {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f).wrapping_shl(shift);
            if b & 0x80 == 0 {
                return Ok(value);
            }
            shift = shift.wrapping_add(7);
        }
    }

    fn skip(&mut self, n: u64) -> Result<(), Stop> {
        let skipped = std::io::copy(&mut (&mut self.input).take(n), &mut std::io::sink())
            .map_err(|_| Stop::Malformed)?;
        self.consumed += skipped;
        if skipped < n {
            return Err(Stop::Malformed);
        }
        Ok(())
    }

    fn spend(&mut self, elements: u64) -> Result<(), Stop> {
        if elements > self.budget {
            return Err(Stop::TooMany { claimed: elements });
        }
        self.budget -= elements;
        Ok(())
    }

    /// A value of type `kind`, consumed as the crate consumes it.
    fn value(&mut self, kind: u8, depth: usize) -> Result<(), Stop> {
        if depth > MAX_DEPTH {
            return Err(Stop::Malformed);
        }
        match kind {
            // In a struct the value is in the field's header; in a list the crate reads nothing.
            BOOL_TRUE | BOOL_FALSE => {}
            BYTE => {
                self.byte()?;
            }
            I16 | I32 | I64 => {
                // The fields wanted are i32s, which the crate truncates to 32 bits.
                let n = zigzag(self.varint()?) as i32;
                for (path, found) in &mut self.wanted {
                    if *path == self.path.as_slice() {
                        *found = Some(n);
                    }
                }
            }
            DOUBLE => self.skip(8)?,
            BINARY => {
                let n = self.varint()?;
                self.skip(n)?;
            }
            LIST | SET => {
                let header = self.byte()?;
                // Some writers give an empty list the header 0.
                if header == 0 {
                    return Ok(());
                }
                let element = header & 0x0f;
                let n = match header >> 4 {
                    15 => self.varint()?,
                    n => u64::from(n),
                };
                if !(BOOL_TRUE..=UUID).contains(&element) || n > i32::MAX as u64 {
                    return Err(Stop::Malformed);
                }
                self.spend(n)?;
                for _ in 0..n {
                    self.value(element, depth + 1)?;
                }
            }
            MAP => {
                let n = self.varint()?;
                if n > i32::MAX as u64 {
                    return Err(Stop::Malformed);
                }
                if n > 0 {
                    let types = self.byte()?;
                    let (key, value) = (types >> 4, types & 0x0f);
                    if ![key, value].iter().all(|t| (BOOL_TRUE..=UUID).contains(t)) {
                        return Err(Stop::Malformed);
                    }
                    self.spend(2 * n)?;
                    for _ in 0..n {
                        self.value(key, depth + 1)?;
                        self.value(value, depth + 1)?;
                    }
                }
            }
            STRUCT => self.fields(depth + 1)?,
            UUID => self.skip(16)?,
            _ => return Err(Stop::Malformed),
        }
        Ok(())
    }

    /// A struct's fields up to its stop byte.
    fn fields(&mut self, depth: usize) -> Result<(), Stop> {
        let mut last_id = 0i16;
        loop {
            let header = self.byte()?;
            let kind = header & 0x0f;
            if kind == 0 {
                return Ok(());
            }
            let id = match header >> 4 {
                0 => zigzag(self.varint()?) as i16,
                delta => last_id
                    .checked_add(i16::from(delta))
                    .ok_or(Stop::Malformed)?,
            };
            self.spend(1)?;
            self.path.push(id);
            let value = self.value(kind, depth);
            self.path.pop();
            value?;
            last_id = id;
        }
    }
}

fn zigzag(n: u64) -> i64 {
    (n >> 1) as i64 ^ -((n & 1) as i64)
}

fn unreadable(shown: &str, e: std::io::Error) -> anyhow::Error {
    anyhow::anyhow!("cannot read {shown}: {e}")
}

/// Moves `file`'s shared position (the crate's reader seeks before each read of its own).
fn seek(mut file: &std::fs::File, to: u64, shown: &str) -> Result<()> {
    file.seek(SeekFrom::Start(to))
        .map_err(|e| unreadable(shown, e))?;
    Ok(())
}

/// What a valid file's structures can hold: every element takes a byte, and so does every field.
fn budget_for(bytes: u64) -> u64 {
    2 * bytes + 64
}

/// Refuses a file whose footer claims more Thrift elements than its bytes could hold. A file too
/// short for a footer, or not ending in `PAR1`, is left for the crate to report.
pub fn check_footer(mut file: &std::fs::File, shown: &str) -> Result<()> {
    let len = file.metadata().map_err(|e| unreadable(shown, e))?.len();
    if len < 12 {
        return Ok(());
    }
    let mut tail = [0u8; 8];
    file.seek(SeekFrom::Start(len - 8))
        .and_then(|_| file.read_exact(&mut tail))
        .map_err(|e| unreadable(shown, e))?;
    let footer_len = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    if &tail[4..] != b"PAR1" || footer_len + 8 > len {
        return Ok(());
    }
    seek(file, len - 8 - footer_len, shown)?;
    let mut walker = Walker::new(
        BufReader::new(file.take(footer_len)),
        budget_for(footer_len),
    );
    let walked = walker.fields(0);
    seek(file, 0, shown)?;
    if let Err(Stop::TooMany { claimed }) = walked {
        bail!(
            "{shown}: corrupt Parquet footer: a Thrift list claims {claimed} elements, more than its {footer_len} bytes could hold"
        );
    }
    Ok(())
}

/// Refuses a file whose page headers claim more Thrift elements than the file could hold, or whose
/// dictionary page claims more values than its bytes could hold (the crate allocates them all
/// before decoding one), walking each column chunk's pages as the crate will read them.
pub fn check_page_headers(file: &std::fs::File, meta: &ParquetMetaData, shown: &str) -> Result<()> {
    let len = file.metadata().map_err(|e| unreadable(shown, e))?.len();
    // One budget for the whole file: its page headers together are no larger than it.
    let mut budget = budget_for(len);
    for group in meta.row_groups() {
        for column in group.columns() {
            let name = || column.column_path().string();
            let start = column
                .dictionary_page_offset()
                .unwrap_or(column.data_page_offset());
            let (Ok(start), Ok(size)) = (
                u64::try_from(start),
                u64::try_from(column.compressed_size()),
            ) else {
                continue;
            };
            let end = start.saturating_add(size).min(len);
            let mut at = start;
            while at < end {
                seek(file, at, shown)?;
                let input = BufReader::with_capacity(4096, file.take(end - at));
                let mut walker = Walker::new(input, budget);
                walker.wanted = [
                    PAGE_TYPE,
                    UNCOMPRESSED_PAGE_SIZE,
                    COMPRESSED_PAGE_SIZE,
                    DICTIONARY_NUM_VALUES,
                ]
                .map(|p| (p, None))
                .to_vec();
                let walked = walker.fields(0);
                budget = walker.budget;
                match walked {
                    Err(Stop::TooMany { claimed }) => bail!(
                        "{shown}: corrupt Parquet page header in column `{}` (byte {at}): a Thrift list claims {claimed} elements, more than the file could hold",
                        name()
                    ),
                    // The crate stops there too, with its own error.
                    Err(Stop::Malformed) => break,
                    Ok(()) => {}
                }
                let Some(data) = walker.found(COMPRESSED_PAGE_SIZE).filter(|&n| n >= 0) else {
                    break;
                };
                if walker.found(PAGE_TYPE) == Some(DICTIONARY_PAGE) {
                    // The bytes the crate decodes the values from: the page as stored, or inflated
                    // to the size the header gives (the crate checks it is that size).
                    let bytes = match column.compression() {
                        Compression::UNCOMPRESSED => Some(data),
                        _ => walker.found(UNCOMPRESSED_PAGE_SIZE),
                    };
                    let values = walker.found(DICTIONARY_NUM_VALUES).unwrap_or(0);
                    let room = bytes.unwrap_or(0).max(0) as u64 * 8 / min_value_bits(column);
                    if values > 0 && values as u64 > room {
                        bail!(
                            "{shown}: corrupt Parquet dictionary page in column `{}` (byte {at}): {values} values in {} bytes",
                            name(),
                            bytes.unwrap_or(0)
                        );
                    }
                }
                at += walker.consumed + data as u64;
            }
        }
    }
    seek(file, 0, shown)
}

/// The fewest bits one plain-encoded value of `column`'s type takes.
fn min_value_bits(column: &ColumnChunkMetaData) -> u64 {
    match column.column_type() {
        PhysicalType::BOOLEAN => 1,
        PhysicalType::INT32 | PhysicalType::FLOAT | PhysicalType::BYTE_ARRAY => 32,
        PhysicalType::INT64 | PhysicalType::DOUBLE => 64,
        PhysicalType::INT96 => 96,
        PhysicalType::FIXED_LEN_BYTE_ARRAY => 8 * column.column_descr().type_length().max(1) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks `bytes` as a struct: the integer at `path`, if any.
    fn walk(bytes: &[u8], path: &'static [i16]) -> Result<Option<i32>, Stop> {
        let mut w = Walker::new(bytes, budget_for(bytes.len() as u64));
        w.wanted = vec![(path, None)];
        w.fields(0)?;
        Ok(w.found(path))
    }

    #[test]
    fn a_well_formed_struct_is_walked_to_its_end_and_its_field_read() {
        // field 1: i32 -3; field 2: list of 3 i64; field 3: i32 100; field 4: struct {i32 7};
        // field 5: binary "ab"; field 7 (delta 0, id by varint): map {i32: double}; stop.
        let bytes = [
            0x15, 0x05, 0x19, 0x36, 0x02, 0x04, 0x06, 0x15, 0xc8, 0x01, 0x1c, 0x15, 0x0e, 0x00,
            0x18, 0x02, b'a', b'b', 0x0b, 0x0e, 0x01, 0x57, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0x00,
        ];
        assert_eq!(walk(&bytes, &[3]), Ok(Some(100)));
        assert_eq!(walk(&bytes, &[1]), Ok(Some(-3)));
        assert_eq!(walk(&bytes, &[4, 1]), Ok(Some(7)));
        assert_eq!(walk(&bytes, &[1, 1]), Ok(None));
        // An i32 whose varint runs past 32 bits is truncated, as the crate reads it: 2^33 + 6 → 3.
        let long = [0x15, 0x86, 0x80, 0x80, 0x80, 0x20, 0x00];
        assert_eq!(walk(&long, &[1]), Ok(Some(3)));
        assert_eq!(walk(&bytes[..bytes.len() - 1], &[]), Err(Stop::Malformed));
    }

    #[test]
    fn a_list_of_booleans_longer_than_the_bytes_is_refused() {
        // field 1: a list of 2^31 - 1 booleans in 7 bytes (the crate would loop 2^31 times).
        let bytes = [0x19, 0xf1, 0xff, 0xff, 0xff, 0xff, 0x07, 0x00];
        assert_eq!(
            walk(&bytes, &[]),
            Err(Stop::TooMany {
                claimed: i32::MAX as u64
            })
        );
        // A short one is walked as the crate reads it: no bytes for its booleans.
        assert_eq!(walk(&[0x19, 0x51, 0x00], &[]), Ok(None));
        // A map of booleans to booleans, and lists of lists, are counted the same way.
        assert!(matches!(
            walk(&[0x1b, 0xff, 0xff, 0x03, 0x11, 0x00], &[]),
            Err(Stop::TooMany { .. })
        ));
        let nested = [0x19, 0x39, 0xf1, 0xff, 0x01, 0x01, 0x01, 0x00];
        assert!(matches!(walk(&nested, &[]), Err(Stop::TooMany { .. })));
    }

    #[test]
    fn nesting_past_the_crates_depth_is_left_to_the_crate() {
        let mut bytes = vec![0x1c; MAX_DEPTH + 2];
        bytes.extend(vec![0x00; MAX_DEPTH + 3]);
        assert_eq!(walk(&bytes, &[]), Err(Stop::Malformed));
    }
}
