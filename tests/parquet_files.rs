//! Parquet datasets read as JSON rows: files written here with the parquet crate's own writer (one per
//! TRL dataset shape and compression codec), files written by pyarrow (tests/fixtures/parquet, see its
//! README), and broken files that must give an error naming the file — never a panic.

use rlhf::data::parquet as parquet_reader;

use parquet::basic::{Compression, GzipLevel, ZstdLevel};
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, FloatType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use parquet_reader::read_parquet;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One leaf column's values with its definition and repetition levels (empty = not needed).
enum Col {
    Str(Vec<&'static str>, Vec<i16>, Vec<i16>),
    I64(Vec<i64>, Vec<i16>, Vec<i16>),
    F32(Vec<f32>, Vec<i16>),
    F64(Vec<f64>, Vec<i16>),
    Bool(Vec<bool>, Vec<i16>),
}

fn levels(l: &[i16]) -> Option<&[i16]> {
    (!l.is_empty()).then_some(l)
}

/// Writes `row_groups` (each: one `Col` per leaf column, in schema order) under `schema`.
fn write(path: &Path, schema: &str, codec: Compression, row_groups: Vec<Vec<Col>>) {
    let schema = Arc::new(parse_message_type(schema).unwrap());
    let props = Arc::new(WriterProperties::builder().set_compression(codec).build());
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
    for cols in row_groups {
        let mut rg = writer.next_row_group().unwrap();
        for col in cols {
            let mut w = rg
                .next_column()
                .unwrap()
                .expect("more Cols than leaf columns");
            match &col {
                Col::Str(v, d, r) => {
                    let v: Vec<ByteArray> = v.iter().map(|s| ByteArray::from(*s)).collect();
                    w.typed::<ByteArrayType>()
                        .write_batch(&v, levels(d), levels(r))
                        .unwrap();
                }
                Col::I64(v, d, r) => {
                    w.typed::<Int64Type>()
                        .write_batch(v, levels(d), levels(r))
                        .unwrap();
                }
                Col::F32(v, d) => {
                    w.typed::<FloatType>()
                        .write_batch(v, levels(d), None)
                        .unwrap();
                }
                Col::F64(v, d) => {
                    w.typed::<DoubleType>()
                        .write_batch(v, levels(d), None)
                        .unwrap();
                }
                Col::Bool(v, d) => {
                    w.typed::<BoolType>()
                        .write_batch(v, levels(d), None)
                        .unwrap();
                }
            }
            w.close().unwrap();
        }
        assert!(
            rg.next_column().unwrap().is_none(),
            "fewer Cols than leaf columns"
        );
        rg.close().unwrap();
    }
    writer.close().unwrap();
}

/// Levels of a nullable LIST column's leaf (definition level `leaf_def` when present): a `None` row is
/// a null list, `Some(n)` a list of `n` non-null items (0 = an empty list).
fn list_levels(rows: &[Option<usize>], leaf_def: i16) -> (Vec<i16>, Vec<i16>) {
    let (mut def, mut rep) = (Vec::new(), Vec::new());
    for row in rows {
        let (first_def, n) = match row {
            None => (0, 1),
            Some(0) => (1, 1),
            Some(n) => (leaf_def, *n),
        };
        def.extend(std::iter::repeat_n(first_def, n));
        rep.push(0);
        rep.extend(std::iter::repeat_n(1, n - 1));
    }
    (def, rep)
}

const MESSAGE_LIST: &str = "optional group NAME (LIST) {
    repeated group list {
      optional group element {
        optional binary role (STRING);
        optional binary content (STRING);
      }
    }
  }";

/// The two leaf columns (role, content) of a list<struct<role, content>> column.
fn message_cols(rows: &[&[(&'static str, &'static str)]]) -> [Col; 2] {
    let counts: Vec<Option<usize>> = rows.iter().map(|r| Some(r.len())).collect();
    let (def, rep) = list_levels(&counts, 4);
    let roles = rows.iter().flat_map(|r| r.iter().map(|m| m.0)).collect();
    let contents = rows.iter().flat_map(|r| r.iter().map(|m| m.1)).collect();
    [
        Col::Str(roles, def.clone(), rep.clone()),
        Col::Str(contents, def, rep),
    ]
}

fn rows(path: &Path) -> Vec<Value> {
    let got = read_parquet(path).unwrap_or_else(|e| panic!("{e:#}"));
    let numbers: Vec<usize> = got.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        numbers,
        (1..=got.len()).collect::<Vec<_>>(),
        "1-based row numbers in order"
    );
    got.into_iter().map(|(_, v)| v).collect()
}

#[test]
fn text_prompt_completion_over_two_row_groups() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sft.parquet");
    let schema = "message schema {
        optional binary text (STRING);
        required binary prompt (STRING);
        optional binary completion (STRING);
        required int64 id;
        optional boolean keep;
        optional double score;
    }";
    write(
        &path,
        schema,
        Compression::SNAPPY,
        vec![
            vec![
                Col::Str(
                    vec!["Hello world.", "Ünïcödé ✓ \"quoted\"\n"],
                    vec![1, 1],
                    vec![],
                ),
                Col::Str(vec!["What is 2+2?", "Say hi"], vec![], vec![]),
                Col::Str(vec![" 4", ""], vec![1, 1], vec![]),
                Col::I64(vec![-7, 1 << 40], vec![], vec![]),
                Col::Bool(vec![true], vec![1, 0]),
                Col::F64(vec![0.1, -2.5e-8], vec![1, 1]),
            ],
            vec![
                Col::Str(vec![], vec![0], vec![]),
                Col::Str(vec!["third"], vec![], vec![]),
                Col::Str(vec!["done"], vec![1], vec![]),
                Col::I64(vec![3], vec![], vec![]),
                Col::Bool(vec![false], vec![1]),
                Col::F64(vec![], vec![0]),
            ],
        ],
    );
    assert_eq!(
        rows(&path),
        vec![
            json!({"text": "Hello world.", "prompt": "What is 2+2?", "completion": " 4",
                   "id": -7, "keep": true, "score": 0.1}),
            json!({"text": "Ünïcödé ✓ \"quoted\"\n", "prompt": "Say hi", "completion": "",
                   "id": 1_u64 << 40, "keep": null, "score": -2.5e-8}),
            json!({"text": null, "prompt": "third", "completion": "done",
                   "id": 3, "keep": false, "score": null}),
        ]
    );
    // Columns keep the file's order, like the keys of a JSONL line.
    let keys: Vec<String> = rows(&path)[0]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(
        keys,
        ["text", "prompt", "completion", "id", "keep", "score"]
    );
}

#[test]
fn preferences_with_a_null_float_margin() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prefs.parquet");
    let schema = "message schema {
        optional binary prompt (STRING);
        optional binary chosen (STRING);
        optional binary rejected (STRING);
        optional float margin;
    }";
    write(
        &path,
        schema,
        Compression::GZIP(GzipLevel::default()),
        vec![vec![
            Col::Str(
                vec!["The sky is", "Water is", "Fire is"],
                vec![1, 1, 1],
                vec![],
            ),
            Col::Str(vec![" blue.", " wet.", " hot."], vec![1, 1, 1], vec![]),
            Col::Str(vec![" green.", " dry.", " cold."], vec![1, 1, 1], vec![]),
            // float32 values read back by their shortest decimal form (0.1, not 0.100000001490116).
            Col::F32(vec![0.1, f32::NAN], vec![1, 0, 1]),
        ]],
    );
    assert_eq!(
        rows(&path),
        vec![
            json!({"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "margin": 0.1}),
            json!({"prompt": "Water is", "chosen": " wet.", "rejected": " dry.", "margin": null}),
            // NaN has no JSON form: null.
            json!({"prompt": "Fire is", "chosen": " hot.", "rejected": " cold.", "margin": null}),
        ]
    );
}

#[test]
fn rankings_list_of_strings_and_list_of_ints() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rankings.parquet");
    let schema = "message schema {
        required binary prompt (STRING);
        optional group completions (LIST) {
          repeated group list { optional binary element (STRING); }
        }
        optional group ranking (LIST) {
          repeated group list { optional int64 element; }
        }
    }";
    let shapes = [Some(3), Some(2), Some(0), None];
    let (def, rep) = list_levels(&shapes, 3);
    write(
        &path,
        schema,
        Compression::ZSTD(ZstdLevel::default()),
        vec![vec![
            Col::Str(vec!["p1", "p2", "p3", "p4"], vec![], vec![]),
            Col::Str(vec!["a", "b", "c", "x", "y"], def.clone(), rep.clone()),
            Col::I64(vec![2, 0, 1, 1, 0], def, rep),
        ]],
    );
    assert_eq!(
        rows(&path),
        vec![
            json!({"prompt": "p1", "completions": ["a", "b", "c"], "ranking": [2, 0, 1]}),
            json!({"prompt": "p2", "completions": ["x", "y"], "ranking": [1, 0]}),
            json!({"prompt": "p3", "completions": [], "ranking": []}),
            json!({"prompt": "p4", "completions": null, "ranking": null}),
        ]
    );
}

#[test]
fn messages_list_of_structs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("messages.parquet");
    let schema = format!(
        "message schema {{ {} }}",
        MESSAGE_LIST.replace("NAME", "messages")
    );
    let [role, content] = message_cols(&[
        &[
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello!"),
        ],
        &[("user", "2+2?"), ("assistant", "4")],
    ]);
    write(
        &path,
        &schema,
        Compression::LZ4_RAW,
        vec![vec![role, content]],
    );
    assert_eq!(
        rows(&path),
        vec![
            json!({"messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
            ]}),
            json!({"messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ]}),
        ]
    );
}

#[test]
fn conversational_preferences_chosen_rejected_as_message_lists() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("conv_prefs.parquet");
    let schema = format!(
        "message schema {{ {} {} {} }}",
        MESSAGE_LIST.replace("NAME", "prompt"),
        MESSAGE_LIST.replace("NAME", "chosen"),
        MESSAGE_LIST.replace("NAME", "rejected"),
    );
    let [pr, pc] = message_cols(&[&[("user", "Colour of the sky?")]]);
    let [cr, cc] = message_cols(&[&[("assistant", "Blue.")]]);
    let [rr, rc] = message_cols(&[&[("assistant", "Green.")]]);
    write(
        &path,
        &schema,
        Compression::UNCOMPRESSED,
        vec![vec![pr, pc, cr, cc, rr, rc]],
    );
    assert_eq!(
        rows(&path),
        vec![json!({
            "prompt": [{"role": "user", "content": "Colour of the sky?"}],
            "chosen": [{"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "assistant", "content": "Green."}],
        })]
    );
}

// ---- files written by pyarrow (see tests/fixtures/parquet/README.md) ----

fn fixture(name: &str) -> PathBuf {
    crate::common::fixture(&format!("parquet/{name}"))
}

#[test]
fn pyarrow_messages_snappy_and_zstd() {
    let want = vec![
        json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
               "prompt": "p"}),
        json!({"messages": [{"role": "user", "content": "Ünïcödé ✓"}], "prompt": null}),
        json!({"messages": [], "prompt": "q"}),
    ];
    for name in ["messages_snappy.parquet", "messages_zstd.parquet"] {
        assert_eq!(rows(&fixture(name)), want, "{name}");
    }
}

#[test]
fn pyarrow_preferences_and_rankings() {
    assert_eq!(
        rows(&fixture("preferences_gzip.parquet")),
        vec![
            json!({"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "margin": 0.5}),
            json!({"prompt": "Water is", "chosen": " wet.", "rejected": " dry.", "margin": null}),
        ]
    );
    assert_eq!(
        rows(&fixture("rankings_snappy.parquet")),
        vec![
            json!({"prompt": "p1", "completions": ["a", "b", "c"], "ranking": [2, 0, 1]}),
            json!({"prompt": "p2", "completions": ["x", "y"], "ranking": [1, 0]}),
        ]
    );
}

// ---- errors: name the file, never panic ----

fn err(path: &Path) -> String {
    match read_parquet(path) {
        Ok(rows) => panic!(
            "{}: expected an error, read {} rows",
            path.display(),
            rows.len()
        ),
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(
                msg.contains(&path.display().to_string()),
                "no path in: {msg}"
            );
            msg
        }
    }
}

fn valid_file(dir: &Path) -> PathBuf {
    let path = dir.join("valid.parquet");
    let schema = format!(
        "message schema {{ required binary prompt (STRING); {} optional double margin; }}",
        MESSAGE_LIST.replace("NAME", "messages")
    );
    let chat: &[(&str, &str)] = &[("user", "Hi there"), ("assistant", "Hello")];
    let [role, content] = message_cols(&[chat; 5]);
    write(
        &path,
        &schema,
        Compression::SNAPPY,
        vec![vec![
            Col::Str(vec!["a", "b", "c", "d", "e"], vec![], vec![]),
            role,
            content,
            Col::F64(vec![1.0, 2.0, 3.0, 4.0, 5.0], vec![1; 5]),
        ]],
    );
    path
}

#[test]
fn missing_garbage_and_truncated_files_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.parquet");
    assert!(err(&missing).contains("cannot open"));

    let garbage = dir.path().join("garbage.parquet");
    std::fs::write(
        &garbage,
        b"{\"prompt\": \"this is JSONL, not Parquet\"}\n".repeat(10),
    )
    .unwrap();
    assert!(err(&garbage).contains("not a readable Parquet file"));

    let bytes = std::fs::read(valid_file(dir.path())).unwrap();
    assert_eq!(rows(&dir.path().join("valid.parquet")).len(), 5);
    let truncated = dir.path().join("truncated.parquet");
    for keep in [bytes.len() - 1, bytes.len() / 2, 7, 4] {
        std::fs::write(&truncated, &bytes[..keep]).unwrap();
        assert!(err(&truncated).contains("not a readable Parquet file"));
    }
}

#[test]
fn a_codec_left_out_of_the_build_is_named() {
    let msg = err(&fixture("prompt_brotli.parquet"));
    assert!(
        msg.contains("column `prompt` is brotli-compressed"),
        "{msg}"
    );
}

#[test]
fn corrupt_bytes_anywhere_give_an_error_or_rows_but_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.parquet");
    let mut errors = 0;
    let sources = [
        valid_file(dir.path()),
        fixture("messages_snappy.parquet"),
        fixture("messages_zstd.parquet"),
        fixture("rankings_snappy.parquet"),
        fixture("preferences_gzip.parquet"),
    ];
    for source in sources {
        let bytes = std::fs::read(&source).unwrap();
        for at in 0..bytes.len() {
            for flip in [0xff_u8, 0x01] {
                let mut b = bytes.clone();
                b[at] ^= flip;
                std::fs::write(&corrupt, &b).unwrap();
                let result = std::panic::catch_unwind(|| read_parquet(&corrupt));
                match result {
                    Err(_) => panic!(
                        "{}: panicked with byte {at} xor {flip:#x}",
                        source.display()
                    ),
                    Ok(Err(e)) => {
                        errors += 1;
                        let msg = format!("{e:#}");
                        assert!(msg.contains(&corrupt.display().to_string()), "{msg}");
                    }
                    Ok(Ok(_)) => {} // e.g. a flipped letter inside a string value
                }
            }
        }
    }
    assert!(errors > 0);
}

#[test]
fn files_without_rows_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let no_rows = dir.path().join("no_rows.parquet");
    write(
        &no_rows,
        "message schema { required binary prompt (STRING); }",
        Compression::SNAPPY,
        vec![],
    );
    assert!(err(&no_rows).contains("no records"));

    let zero_rows_group = dir.path().join("zero_rows_group.parquet");
    write(
        &zero_rows_group,
        "message schema { required binary prompt (STRING); }",
        Compression::SNAPPY,
        vec![vec![Col::Str(vec![], vec![], vec![])]],
    );
    assert!(err(&zero_rows_group).contains("no records"));

    let empty = dir.path().join("empty.parquet");
    std::fs::write(&empty, b"").unwrap();
    assert!(err(&empty).contains("no records"));
}

/// Thrift lists that claim more elements than the file holds: the parquet crate skips a field it
/// does not know taking each boolean in a list as no bytes, so 9 bytes kept it busy for 2³¹
/// steps per list (found by fuzzing: fuzz/regressions/parquet_file). Refused before it decodes.
#[test]
fn footers_and_page_headers_claiming_billions_of_elements_are_refused() {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let dir = tempfile::tempdir().unwrap();
    let good = fixture("preferences_gzip.parquet");
    let bytes = std::fs::read(&good).unwrap();
    // A field the crate does not know (id 100, type list): 2^31 - 1 booleans.
    let bomb = [0x09, 0xc8, 0x01, 0xf1, 0xff, 0xff, 0xff, 0xff, 0x07];
    let with_bomb_at = |name: &str, at: usize| {
        let mut b = bytes.clone();
        b[at..at + bomb.len()].copy_from_slice(&bomb);
        let path = dir.path().join(name);
        std::fs::write(&path, b).unwrap();
        path
    };
    let footer_len = u32::from_le_bytes(bytes[bytes.len() - 8..][..4].try_into().unwrap());
    let footer = with_bomb_at("footer.parquet", bytes.len() - 8 - footer_len as usize);
    let e = err(&footer);
    assert!(
        e.contains(
            "footer.parquet: corrupt Parquet footer: a Thrift list claims 2147483647 elements"
        ),
        "{e}"
    );

    let reader = SerializedFileReader::new(std::fs::File::open(&good).unwrap()).unwrap();
    let column = reader.metadata().row_group(0).column(0);
    let first_page = column
        .dictionary_page_offset()
        .unwrap_or(column.data_page_offset());
    let page = with_bomb_at("page.parquet", first_page as usize);
    let e = err(&page);
    assert!(
        e.contains("page.parquet: corrupt Parquet page header in column `prompt`"),
        "{e}"
    );
    // The file it was made from reads.
    assert!(!rows(&good).is_empty());
}
