//! Metrics sink shared by every training loop.
//!
//! Each [`MetricsLogger::log`] call writes one JSON object per line to `<dir>/metrics.jsonl`
//! and one `tensorflow.Event` holding a scalar summary per metric to a TensorBoard event file
//! under `<dir>/tensorboard/`.
//!
//! The event file is written directly (no protobuf dependency): it is a TFRecord stream where
//! every record is framed as
//!
//! ```text
//! u64 length (little endian) | u32 masked_crc32c(length bytes) | data | u32 masked_crc32c(data)
//! ```
//!
//! and `data` is a protobuf-encoded `tensorflow.Event`:
//!
//! * `double wall_time = 1;` `int64 step = 2;` `string file_version = 3;` `Summary summary = 5;`
//! * `Summary { repeated Value value = 1; }`
//! * `Summary.Value { string tag = 1; float simple_value = 2; }`
//!
//! This module has no crate-internal imports on purpose.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

/// Name of the JSONL file inside the run directory.
pub const JSONL_FILE: &str = "metrics.jsonl";
/// Name of the TensorBoard sub-directory inside the run directory.
pub const TENSORBOARD_DIR: &str = "tensorboard";
/// `file_version` written in the first event of every event file.
pub const FILE_VERSION: &str = "brain.Event:2";

/// Writes training metrics as JSONL and as TensorBoard scalars.
pub struct MetricsLogger {
    jsonl: BufWriter<File>,
    jsonl_path: PathBuf,
    events: BufWriter<File>,
    events_path: PathBuf,
}

impl MetricsLogger {
    /// Creates `<dir>/metrics.jsonl` and
    /// `<dir>/tensorboard/events.out.tfevents.<unix_secs>.<hostname>.rlhf`
    /// (hostname from `/etc/hostname`, or `localhost`).
    ///
    /// `resumed_at`: for a run resumed from the checkpoint of that step, the existing
    /// `metrics.jsonl` keeps its lines up to that step and is extended; the lines of later steps
    /// (logged by the interrupted run after its last checkpoint, so about to be logged again) and a
    /// partial last line are dropped. With `None` the file starts over. A new event file is
    /// started in both cases; should that name already exist (two loggers created within the same
    /// second) a numeric suffix is added, so nothing is ever overwritten.
    pub fn create(dir: &Path, resumed_at: Option<u64>) -> Result<Self> {
        let tb_dir = dir.join(TENSORBOARD_DIR);
        std::fs::create_dir_all(&tb_dir)
            .with_context(|| format!("creating metrics directory {}", tb_dir.display()))?;

        let jsonl_path = dir.join(JSONL_FILE);
        let jsonl_file = open_jsonl(&jsonl_path, resumed_at)?;

        let now = SystemTime::now();
        let secs = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let base = format!("events.out.tfevents.{secs}.{}.rlhf", hostname());
        let (events_file, events_path) = create_new_numbered(&tb_dir, &base)?;

        let mut logger = MetricsLogger {
            jsonl: BufWriter::new(jsonl_file),
            jsonl_path,
            events: BufWriter::new(events_file),
            events_path,
        };
        let mut first = Vec::with_capacity(32);
        put_double(&mut first, 1, unix_seconds(now));
        put_bytes(&mut first, 3, FILE_VERSION.as_bytes());
        logger.write_record(&first)?;
        // Make the header visible immediately so TensorBoard sees a valid file.
        logger.flush()?;
        Ok(logger)
    }

    /// Path of the JSONL file.
    pub fn jsonl_path(&self) -> &Path {
        &self.jsonl_path
    }

    /// Path of the TensorBoard event file this logger writes.
    pub fn event_file_path(&self) -> &Path {
        &self.events_path
    }

    /// Writes one JSON line `{"step": step, "time": <unix secs>, <name>: value, ...}` (names in
    /// the given order; non-finite values become `null`) and one TensorBoard event at `step`
    /// holding one scalar per name (as `f32`, non-finite values kept).
    ///
    /// Names must be unique and must not be `step` or `time`.
    pub fn log(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        for (i, (name, _)) in values.iter().enumerate() {
            if *name == "step" || *name == "time" {
                bail!(
                    "metric name {name:?} is reserved in {}",
                    self.jsonl_path.display()
                );
            }
            if values[..i].iter().any(|(n, _)| n == name) {
                bail!(
                    "metric {name:?} given twice at step {step} ({})",
                    self.jsonl_path.display()
                );
            }
        }
        let wall_time = unix_seconds(SystemTime::now());

        // JSONL line.
        let mut line = String::with_capacity(48 + 32 * values.len());
        line.push_str("{\"step\":");
        line.push_str(&step.to_string());
        line.push_str(",\"time\":");
        push_json_number(&mut line, wall_time);
        for (name, value) in values {
            line.push(',');
            line.push_str(&serde_json::to_string(name).expect("string serialisation cannot fail"));
            line.push(':');
            push_json_number(&mut line, *value);
        }
        line.push_str("}\n");
        self.jsonl
            .write_all(line.as_bytes())
            .with_context(|| format!("writing {}", self.jsonl_path.display()))?;

        // TensorBoard event.
        let mut summary = Vec::with_capacity(16 * values.len());
        let mut value_msg = Vec::with_capacity(64);
        for (name, value) in values {
            value_msg.clear();
            put_bytes(&mut value_msg, 1, name.as_bytes());
            put_float(&mut value_msg, 2, *value as f32);
            put_bytes(&mut summary, 1, &value_msg);
        }
        let mut event = Vec::with_capacity(summary.len() + 32);
        put_double(&mut event, 1, wall_time);
        put_varint_field(&mut event, 2, step);
        put_bytes(&mut event, 5, &summary);
        self.write_record(&event)?;
        // Every step reaches the files at once, for `tail -f` and a live TensorBoard: a step is
        // seconds of compute, a flush microseconds.
        self.flush()
    }

    /// Flushes both files to the operating system.
    pub fn flush(&mut self) -> Result<()> {
        self.jsonl
            .flush()
            .with_context(|| format!("flushing {}", self.jsonl_path.display()))?;
        self.events
            .flush()
            .with_context(|| format!("flushing {}", self.events_path.display()))?;
        Ok(())
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut frame = Vec::with_capacity(data.len() + 16);
        frame.extend_from_slice(&len);
        frame.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        frame.extend_from_slice(data);
        frame.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.events
            .write_all(&frame)
            .with_context(|| format!("writing {}", self.events_path.display()))
    }
}

impl Drop for MetricsLogger {
    fn drop(&mut self) {
        let _ = self.jsonl.flush();
        let _ = self.events.flush();
    }
}

/// Opens the JSONL file: a fresh one, or for a resumed run the existing one cut back to the lines
/// of steps up to `resumed_at` (a partial last line from a crash mid-write is dropped too).
fn open_jsonl(path: &Path, resumed_at: Option<u64>) -> Result<File> {
    let ctx = || format!("opening {}", path.display());
    let Some(resumed_at) = resumed_at else {
        return File::create(path).with_context(ctx);
    };
    let kept: String = match std::fs::read_to_string(path) {
        Ok(text) => text
            .split_inclusive('\n')
            .filter(|line| {
                line.ends_with('\n')
                    && serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v.get("step")?.as_u64())
                        .is_some_and(|step| step <= resumed_at)
            })
            .collect(),
        Err(e) if e.kind() == ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    // Rewritten beside and renamed over, so a crash here cannot lose the kept lines.
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, kept.as_bytes())
        .and_then(|_| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing {}", path.display()))?;
    OpenOptions::new().append(true).open(path).with_context(ctx)
}

/// Creates `dir/base`, or `dir/base.1`, `dir/base.2`, ... if it already exists.
fn create_new_numbered(dir: &Path, base: &str) -> Result<(File, PathBuf)> {
    for n in 0u32.. {
        let name = if n == 0 {
            base.to_string()
        } else {
            format!("{base}.{n}")
        };
        let path = dir.join(name);
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists && n < 10_000 => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("creating event file {}", path.display()))
            }
        }
    }
    unreachable!("loop only exits by returning")
}

/// Host name for the event file name: `/etc/hostname`, restricted to filename-safe characters,
/// or `localhost`.
fn hostname() -> String {
    let raw = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "localhost".to_string()
    } else {
        name
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Appends a JSON number, or `null` for NaN/±inf (JSON has no representation for them).
fn push_json_number(out: &mut String, v: f64) {
    if v.is_finite() {
        out.push_str(&serde_json::to_string(&v).expect("finite f64 serialises"));
    } else {
        out.push_str("null");
    }
}

// ---------------------------------------------------------------------------------------------
// Minimal protobuf encoding.

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire_type));
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_key(out, field, 0);
    put_varint(out, v);
}

fn put_double(out: &mut Vec<u8>, field: u32, v: f64) {
    put_key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

fn put_float(out: &mut Vec<u8>, field: u32, v: f32) {
    put_key(out, field, 5);
    out.extend_from_slice(&v.to_le_bytes());
}

// ---------------------------------------------------------------------------------------------
// CRC-32C (Castagnoli), reflected polynomial 0x82F63B78, as used by TFRecord.

const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC-32C (Castagnoli) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC: `((crc >> 15) | (crc << 17)) + 0xa282ead8` (wrapping).
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Adds `values` into `acc` by name (appending names not seen yet, in order).
pub fn add_into(acc: &mut Vec<(String, f64)>, values: &[(String, f64)]) {
    for (k, v) in values {
        match acc.iter_mut().find(|(n, _)| n == k) {
            Some((_, a)) => *a += v,
            None => acc.push((k.clone(), *v)),
        }
    }
}

/// The steps since the last log line: their metrics are logged as means over the window, with
/// the throughput of the window.
pub struct Window {
    sums: Vec<(String, f64)>,
    steps: u64,
    tokens: usize,
    start: std::time::Instant,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            sums: vec![],
            steps: 0,
            tokens: 0,
            start: std::time::Instant::now(),
        }
    }
}

impl Window {
    /// One step's metrics (a step that did not update adds only its tokens).
    pub fn add_step(&mut self, metrics: &[(String, f64)]) {
        add_into(&mut self.sums, metrics);
        self.steps += 1;
    }

    pub fn add_tokens(&mut self, tokens: usize) {
        self.tokens += tokens;
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The means of the window's steps and its tokens per second; starts a new window.
    pub fn close(&mut self) -> (Vec<(String, f64)>, f64) {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let n = self.steps.max(1) as f64;
        let means = self.sums.iter().map(|(k, v)| (k.clone(), v / n)).collect();
        let tps = self.tokens as f64 / secs;
        *self = Window::default();
        (means, tps)
    }
}

/// `name=value` pairs for a progress line (small values in exponent form).
pub fn format_line(values: &[(String, f64)]) -> String {
    values
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}={}",
                if v.abs() >= 1e-3 || *v == 0.0 {
                    format!("{v:.4}")
                } else {
                    format!("{v:.3e}")
                }
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}
