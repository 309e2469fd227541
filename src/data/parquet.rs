//! Parquet datasets (what the Hugging Face Hub serves) read as the same JSON rows a JSONL file gives,
//! so everything after loading handles both formats the same way.
//!
//! Uses the `parquet` crate's row API (no Arrow): each row becomes a `Field` tree that maps onto JSON
//! one to one — groups (structs) become objects, LIST columns arrays, MAP columns objects.

use ::parquet::basic::Compression;
use ::parquet::file::reader::{FileReader, SerializedFileReader};
use ::parquet::record::{Field, Row};
use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Number, Value};
use std::path::Path;

/// Reads every row of a Parquet file as a JSON object (column name → value), in file order, with its
/// 1-based row number, so the rest of the data pipeline handles JSONL and Parquet the same way.
///
/// Strings stay strings, integers and floats become JSON numbers (NaN and ±inf, which JSON cannot hold,
/// become null), nulls become null, lists (e.g. `completions`, `ranking`) arrays and structs (e.g. the
/// `{"role","content"}` items of `messages`) objects. Errors name the file, and the row when one row
/// fails to decode.
pub fn read_parquet(path: &Path) -> Result<Vec<(usize, Value)>> {
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|e| anyhow!("cannot open {shown}: {e}"))?;
    let len = file
        .metadata()
        .map_err(|e| anyhow!("cannot read {shown}: {e}"))?
        .len();
    if len == 0 {
        bail!("{shown}: no records (empty file)");
    }
    // The crate's row decoder panics instead of erroring on some corrupt data (definition levels out of
    // range, say), so decoding runs under `without_panics`: a corrupt file gives an error, not a crash.
    let mut out = Vec::new();
    let decoded = crate::io::without_panics(|| -> Result<()> {
        let name = shown.to_string();
        // Before the crate decodes a Thrift structure: it can spin for hours on a tiny one.
        super::parquet_thrift::check_footer(&file, &name)?;
        let pages = file
            .try_clone()
            .map_err(|e| anyhow!("cannot read {shown}: {e}"))?;
        let reader = SerializedFileReader::new(file).map_err(|e| {
            anyhow!("{shown}: not a readable Parquet file (truncated or corrupt?): {e}")
        })?;
        check_codecs(&reader).map_err(|e| anyhow!("{shown}: {e}"))?;
        super::parquet_thrift::check_page_headers(&pages, reader.metadata(), &name)?;
        let rows = reader
            .get_row_iter(None)
            .map_err(|e| anyhow!("{shown}: cannot read the Parquet schema: {e}"))?;
        for (i, row) in rows.enumerate() {
            let row = row.map_err(|e| anyhow!("{shown}: row {}: cannot decode: {e}", i + 1))?;
            out.push((i + 1, row_to_json(&row)));
        }
        Ok(())
    });
    match decoded {
        Ok(result) => result?,
        Err(panic) => bail!(
            "{shown}: row {}: cannot decode (corrupt Parquet data?): {panic}",
            out.len() + 1
        ),
    }
    if out.is_empty() {
        bail!("{shown}: no records (the Parquet file has no rows)");
    }
    Ok(out)
}

/// Names the first column chunk compressed with a codec this build leaves out (brotli, LZO), instead
/// of failing later with the crate's "disabled feature" message.
fn check_codecs(reader: &SerializedFileReader<std::fs::File>) -> Result<()> {
    for group in reader.metadata().row_groups() {
        for column in group.columns() {
            let codec = match column.compression() {
                Compression::BROTLI(_) => "brotli",
                Compression::LZO => "LZO",
                _ => continue,
            };
            bail!(
                "column `{}` is {codec}-compressed, which rlhf cannot read (it reads uncompressed, \
                 snappy, gzip, lz4 and zstd Parquet files); re-save the file with one of those",
                column.column_path().string()
            );
        }
    }
    Ok(())
}

fn row_to_json(row: &Row) -> Value {
    Value::Object(
        row.get_column_iter()
            .map(|(name, field)| (name.clone(), field_to_json(field)))
            .collect::<Map<String, Value>>(),
    )
}

fn field_to_json(field: &Field) -> Value {
    match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(n) => Value::from(*n),
        Field::Short(n) => Value::from(*n),
        Field::Int(n) => Value::from(*n),
        Field::Long(n) => Value::from(*n),
        Field::UByte(n) => Value::from(*n),
        Field::UShort(n) => Value::from(*n),
        Field::UInt(n) => Value::from(*n),
        Field::ULong(n) => Value::from(*n),
        // Narrow floats go through their shortest decimal form, so a float32 0.1 reads back as 0.1,
        // not as 0.10000000149011612.
        Field::Float16(x) => shortest_float(x.to_string(), x.is_finite()),
        Field::Float(x) => shortest_float(x.to_string(), x.is_finite()),
        Field::Double(x) => Number::from_f64(*x).map_or(Value::Null, Value::Number),
        Field::Str(s) => Value::String(s.clone()),
        // BYTE_ARRAY columns without a STRING annotation: text if it is UTF-8, else the bytes.
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_owned()),
            Err(_) => Value::Array(b.data().iter().map(|&x| Value::from(x)).collect()),
        },
        Field::Decimal(d) if d.scale() >= 0 && d.precision() >= d.scale() => {
            Value::String(field.to_string())
        }
        Field::Decimal(_) => Value::Null,
        Field::Date(days) => match i64::from(*days).checked_mul(86_400_000_000) {
            Some(us) => date_time(us, "%Y-%m-%d", *days),
            None => Value::from(*days),
        },
        Field::TimestampMillis(ms) => match ms.checked_mul(1000) {
            Some(us) => date_time(us, "%Y-%m-%dT%H:%M:%S%.3fZ", *ms),
            None => Value::from(*ms),
        },
        Field::TimestampMicros(us) => date_time(*us, "%Y-%m-%dT%H:%M:%S%.6fZ", *us),
        // Times of day: the crate prints them as HH:MM:SS.fff without any fallible step.
        Field::TimeMillis(_) | Field::TimeMicros(_) => Value::String(field.to_string()),
        Field::Group(row) => row_to_json(row),
        Field::ListInternal(list) => {
            Value::Array(list.elements().iter().map(field_to_json).collect())
        }
        Field::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(k, v)| {
                    let key = match field_to_json(k) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (key, field_to_json(v))
                })
                .collect(),
        ),
    }
}

fn shortest_float(text: String, finite: bool) -> Value {
    match text.parse::<f64>() {
        Ok(x) if finite => Number::from_f64(x).map_or(Value::Null, Value::Number),
        _ => Value::Null,
    }
}

/// A date or UTC timestamp (microseconds since the epoch) as text; out of chrono's range it stays
/// the raw number the file holds.
fn date_time(micros: i64, format: &str, raw: impl Into<Value>) -> Value {
    match chrono::DateTime::from_timestamp_micros(micros) {
        Some(t) => Value::String(t.format(format).to_string()),
        None => raw.into(),
    }
}
