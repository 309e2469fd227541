//! Tests for the metrics sink: JSONL output and TensorBoard event files (parsed here with an
//! independent TFRecord + protobuf reader).

use rlhf::train::metrics::{self, MetricsLogger};
use serde_json::Value;
use std::path::{Path, PathBuf};

// ------------------------------------------------------------------------------------------
// Independent reader: bitwise CRC-32C, TFRecord frames, protobuf fields.

fn crc32c_bitwise(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0x82F6_3B78 & mask);
        }
    }
    crc ^ 0xFFFF_FFFF
}

fn masked(data: &[u8]) -> u32 {
    let c = crc32c_bitwise(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8) // == (c >> 15) | (c << 17)
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Splits a TFRecord stream into records, checking both CRCs.
fn read_records(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        if bytes.len() - pos < 12 {
            return Err(format!("truncated header at {pos}"));
        }
        let len_bytes = &bytes[pos..pos + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        if read_u32(bytes, pos + 8) != masked(len_bytes) {
            return Err(format!("length crc mismatch at {pos}"));
        }
        let start = pos + 12;
        if bytes.len() < start + len + 4 {
            return Err(format!("truncated record at {pos}"));
        }
        let data = &bytes[start..start + len];
        if read_u32(bytes, start + len) != masked(data) {
            return Err(format!("data crc mismatch at {pos}"));
        }
        out.push(data.to_vec());
        pos = start + len + 4;
    }
    Ok(out)
}

#[derive(Debug, Clone)]
enum Field {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(Vec<u8>),
    Fixed32([u8; 4]),
}

fn read_varint(b: &[u8], pos: &mut usize) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let byte = b[*pos];
        *pos += 1;
        v |= u64::from(byte & 0x7F) << shift;
        if byte & 0x80 == 0 {
            return v;
        }
        shift += 7;
        assert!(shift < 64, "varint too long");
    }
}

fn parse_message(b: &[u8]) -> Vec<(u64, Field)> {
    let mut pos = 0;
    let mut fields = Vec::new();
    while pos < b.len() {
        let key = read_varint(b, &mut pos);
        let (num, wt) = (key >> 3, key & 7);
        let f = match wt {
            0 => Field::Varint(read_varint(b, &mut pos)),
            1 => {
                let v = b[pos..pos + 8].try_into().unwrap();
                pos += 8;
                Field::Fixed64(v)
            }
            2 => {
                let n = read_varint(b, &mut pos) as usize;
                let v = b[pos..pos + n].to_vec();
                pos += n;
                Field::Bytes(v)
            }
            5 => {
                let v = b[pos..pos + 4].try_into().unwrap();
                pos += 4;
                Field::Fixed32(v)
            }
            other => panic!("unexpected wire type {other}"),
        };
        fields.push((num, f));
    }
    fields
}

#[derive(Debug, Default)]
struct Event {
    wall_time: Option<f64>,
    step: Option<u64>,
    file_version: Option<String>,
    values: Vec<(String, f32)>,
}

fn decode_event(data: &[u8]) -> Event {
    let mut ev = Event::default();
    for (num, f) in parse_message(data) {
        match (num, f) {
            (1, Field::Fixed64(b)) => ev.wall_time = Some(f64::from_le_bytes(b)),
            (2, Field::Varint(v)) => ev.step = Some(v),
            (3, Field::Bytes(s)) => ev.file_version = Some(String::from_utf8(s).unwrap()),
            (5, Field::Bytes(summary)) => {
                for (snum, sf) in parse_message(&summary) {
                    let Field::Bytes(value) = sf else {
                        panic!("summary.value not a message")
                    };
                    assert_eq!(snum, 1, "summary field");
                    let mut tag = None;
                    let mut simple = None;
                    for (vnum, vf) in parse_message(&value) {
                        match (vnum, vf) {
                            (1, Field::Bytes(t)) => tag = Some(String::from_utf8(t).unwrap()),
                            (2, Field::Fixed32(x)) => simple = Some(f32::from_le_bytes(x)),
                            other => panic!("unexpected value field {other:?}"),
                        }
                    }
                    ev.values.push((tag.unwrap(), simple.unwrap()));
                }
            }
            other => panic!("unexpected event field {other:?}"),
        }
    }
    ev
}

fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("tensorboard"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn read_events(path: &Path) -> Vec<Event> {
    let bytes = std::fs::read(path).unwrap();
    read_records(&bytes)
        .unwrap()
        .iter()
        .map(|r| decode_event(r))
        .collect()
}

fn jsonl_lines(dir: &Path) -> Vec<serde_json::Map<String, Value>> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| match serde_json::from_str::<Value>(l).unwrap() {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        })
        .collect()
}

// ------------------------------------------------------------------------------------------

#[test]
fn crc32c_known_answer() {
    assert_eq!(crc32c_bitwise(b"123456789"), 0xE306_9283);
    assert_eq!(metrics::crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(metrics::crc32c(b""), 0);
    // Table-driven and bitwise implementations agree on arbitrary data.
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 31 + 7) as u8).collect();
    assert_eq!(metrics::crc32c(&data), crc32c_bitwise(&data));
    assert_eq!(metrics::masked_crc32c(&data), masked(&data));
}

#[test]
fn jsonl_lines_keys_order_and_nan() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = MetricsLogger::create(tmp.path(), None).unwrap();
    assert_eq!(log.jsonl_path(), tmp.path().join("metrics.jsonl"));
    log.log(
        1,
        &[
            ("loss", 2.5),
            ("rewards/chosen", -0.125),
            ("objective/kl", f64::NAN),
        ],
    )
    .unwrap();
    log.log(
        2,
        &[("zeta", 1.0), ("alpha", f64::INFINITY), ("mid", 1e-30)],
    )
    .unwrap();
    log.log(3, &[]).unwrap();
    log.flush().unwrap();

    let lines = jsonl_lines(tmp.path());
    assert_eq!(lines.len(), 3);
    let keys: Vec<&str> = lines[0].keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["step", "time", "loss", "rewards/chosen", "objective/kl"]
    );
    assert_eq!(lines[0]["step"], 1);
    assert_eq!(lines[0]["loss"], 2.5);
    assert_eq!(lines[0]["rewards/chosen"], -0.125);
    assert!(lines[0]["objective/kl"].is_null());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let t = lines[0]["time"].as_f64().unwrap();
    assert!(t > 1.6e9 && t <= now + 1.0, "time {t}");

    let keys: Vec<&str> = lines[1].keys().map(String::as_str).collect();
    assert_eq!(keys, ["step", "time", "zeta", "alpha", "mid"]);
    assert!(lines[1]["alpha"].is_null());
    // Written in shortest round-trip form (serde_json's default parser is not exact for
    // such values, so check the text).
    let raw = std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap();
    assert!(
        raw.lines()
            .nth(1)
            .unwrap()
            .ends_with(",\"alpha\":null,\"mid\":1e-30}"),
        "{raw}"
    );
    let keys: Vec<&str> = lines[2].keys().map(String::as_str).collect();
    assert_eq!(keys, ["step", "time"]);
}

#[test]
fn rejects_reserved_and_duplicate_names() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = MetricsLogger::create(tmp.path(), None).unwrap();
    assert!(log.log(1, &[("step", 1.0)]).is_err());
    assert!(log.log(1, &[("a", 1.0), ("a", 2.0)]).is_err());
    log.log(1, &[("a", 1.0)]).unwrap();
    drop(log);
    assert_eq!(jsonl_lines(tmp.path()).len(), 1);
}

#[test]
fn append_keeps_earlier_lines_and_starts_new_event_file() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let mut log = MetricsLogger::create(tmp.path(), None).unwrap();
        log.log(1, &[("loss", 1.0)]).unwrap();
        log.log(2, &[("loss", 0.5)]).unwrap();
        // Dropped without an explicit flush: Drop must flush.
    }
    {
        let mut log = MetricsLogger::create(tmp.path(), Some(2)).unwrap();
        log.log(3, &[("loss", 0.25)]).unwrap();
    }
    let steps: Vec<u64> = jsonl_lines(tmp.path())
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3]);

    let files = event_files(tmp.path());
    assert_eq!(files.len(), 2, "{files:?}");
    let mut all_steps = Vec::new();
    for f in &files {
        let name = f.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        assert!(name.contains(".rlhf"), "{name}");
        let evs = read_events(f);
        assert_eq!(evs[0].file_version.as_deref(), Some("brain.Event:2"));
        all_steps.extend(evs[1..].iter().map(|e| e.step.unwrap()));
    }
    all_steps.sort();
    assert_eq!(all_steps, [1, 2, 3]);

    // A partial last line (crash mid-write) does not swallow the next record.
    let path = tmp.path().join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"step\":4,\"ti");
    std::fs::write(&path, text).unwrap();
    {
        let mut log = MetricsLogger::create(tmp.path(), Some(3)).unwrap();
        log.log(4, &[("loss", 0.125)]).unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let last = text.lines().last().unwrap();
    let v: Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["step"], 4);

    // Resuming from an earlier checkpoint drops the steps logged after it (they are redone).
    {
        let mut log = MetricsLogger::create(tmp.path(), Some(2)).unwrap();
        log.log(3, &[("loss", 0.3)]).unwrap();
        // Flushed at once, before the logger is dropped: a live reader sees the step.
        let steps: Vec<u64> = jsonl_lines(tmp.path())
            .iter()
            .map(|l| l["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2, 3]);
        assert_eq!(jsonl_lines(tmp.path())[2]["loss"], 0.3);
    }

    // Without append the JSONL starts over.
    {
        let mut log = MetricsLogger::create(tmp.path(), None).unwrap();
        log.log(7, &[("loss", 0.0)]).unwrap();
    }
    let steps: Vec<u64> = jsonl_lines(tmp.path())
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [7]);
}

#[test]
fn event_file_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let logged: Vec<(u64, Vec<(&str, f64)>)> = vec![
        (0, vec![("loss", 2.0), ("lr", 1e-5)]),
        (
            10,
            vec![
                ("loss", 1.2345678901),
                ("rewards/chosen", -3.5),
                ("objective/kl", f64::NAN),
            ],
        ),
        (
            300,
            vec![("loss", f64::INFINITY), ("policy/clipfrac_avg", 0.1)],
        ),
        (1 << 40, vec![]),
    ];
    let event_path;
    {
        let mut log = MetricsLogger::create(tmp.path(), None).unwrap();
        event_path = log.event_file_path().to_path_buf();
        for (step, vals) in &logged {
            log.log(*step, vals).unwrap();
        }
        log.flush().unwrap();
    }
    let files = event_files(tmp.path());
    assert_eq!(files, std::slice::from_ref(&event_path));
    let name = event_path.file_name().unwrap().to_str().unwrap();
    let secs: u64 = name
        .strip_prefix("events.out.tfevents.")
        .unwrap()
        .split('.')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(secs > 1_600_000_000);
    assert!(name.ends_with(".rlhf"), "{name}");

    let evs = read_events(&event_path);
    assert_eq!(evs.len(), 1 + logged.len());
    assert_eq!(evs[0].file_version.as_deref(), Some("brain.Event:2"));
    assert!(evs[0].wall_time.unwrap() > 1.6e9);
    assert!(evs[0].values.is_empty());
    for (ev, (step, vals)) in evs[1..].iter().zip(&logged) {
        assert_eq!(ev.step, Some(*step));
        assert!(ev.wall_time.unwrap() >= evs[0].wall_time.unwrap());
        assert!(ev.file_version.is_none());
        assert_eq!(ev.values.len(), vals.len());
        for ((tag, got), (name, want)) in ev.values.iter().zip(vals) {
            assert_eq!(tag, name);
            let want = *want as f32;
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{tag}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn corrupted_byte_fails_crc_check() {
    let tmp = tempfile::tempdir().unwrap();
    let path = {
        let mut log = MetricsLogger::create(tmp.path(), None).unwrap();
        log.log(1, &[("loss", 0.5), ("rewards/margins", 1.5)])
            .unwrap();
        log.event_file_path().to_path_buf()
    };
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(read_records(&bytes).unwrap().len(), 2);
    // Flip one bit in every byte position in turn: each corruption must be detected.
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x01;
        assert!(
            read_records(&bad).is_err(),
            "corruption at byte {i} not detected"
        );
    }
    // A specific byte inside the data of the second record: the data CRC must be the one failing.
    let first_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let second_data = 12 + first_len + 4 + 12;
    let mut bad = bytes.clone();
    bad[second_data + 3] = bad[second_data + 3].wrapping_add(1);
    let err = read_records(&bad).unwrap_err();
    assert!(err.contains("data crc"), "{err}");
}

#[test]
fn errors_name_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    // A regular file where the directory should be.
    let blocker = tmp.path().join("run");
    std::fs::write(&blocker, b"x").unwrap();
    let err = MetricsLogger::create(&blocker, None)
        .err()
        .expect("must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains(&blocker.display().to_string()), "{msg}");
}
