//! Chat templates rendered as transformers' `apply_chat_template` renders them: the golden
//! conversations of both tokenizer fixtures (made by transformers 5.24), and the jinja2
//! behaviours that templates on the Hub rely on. The expected strings of the unit cases are what
//! jinja2 + transformers print for the same template and data.

use rlhf::text::Tokenizer;
use rlhf::text::{apply_chat_template, ChatTemplate};
use serde_json::{json, Map, Value};

use crate::common::fixture;

fn load(name: &str) -> (Tokenizer, Value) {
    let dir = fixture(name);
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    let golden =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    (tok, golden)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn user(content: &str) -> Value {
    json!([{"role": "user", "content": content}])
}

/// Renders `source` (no special tokens) with `messages` and extra variables.
fn render(source: &str, messages: &Value, extra: Value) -> anyhow::Result<String> {
    let extra: Map<String, Value> = extra.as_object().cloned().unwrap_or_default();
    ChatTemplate::new(source, None, None)?.render_with(messages, false, &extra)
}

fn check_golden(name: &str) {
    let (tok, golden) = load(name);
    let source = tok
        .chat_template
        .clone()
        .expect("fixture has a chat template");
    let template =
        ChatTemplate::new(&source, tok.bos_token.as_deref(), tok.eos_token.as_deref()).unwrap();
    let cases = golden["chat"].as_array().unwrap();
    assert!(!cases.is_empty());
    for (i, case) in cases.iter().enumerate() {
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let want_text = case["text"].as_str().unwrap();
        let text = template.render(&case["messages"], agp).unwrap();
        assert_eq!(text, want_text, "{name} chat case {i}: rendered text");
        let (text2, got_ids) = apply_chat_template(&tok, &case["messages"], agp).unwrap();
        assert_eq!(
            text2, want_text,
            "{name} chat case {i}: apply_chat_template text"
        );
        assert_eq!(got_ids, ids(&case["ids"]), "{name} chat case {i}: ids");
    }
}

#[test]
fn golden_chatml() {
    check_golden("tokenizer");
}

#[test]
fn golden_llama3_has_exactly_one_bos() {
    check_golden("tokenizer-llama3");
    let (tok, golden) = load("tokenizer-llama3");
    let bos = tok.token_id("<|begin_of_text|>").unwrap();
    for case in golden["chat"].as_array().unwrap() {
        let (_, got) = apply_chat_template(&tok, &case["messages"], true).unwrap();
        assert_eq!(got[0], bos);
        assert_eq!(
            got.iter().filter(|&&t| t == bos).count(),
            1,
            "one BOS, written by the template"
        );
    }
}

#[test]
fn apply_chat_template_without_template_errors() {
    let (mut tok, _) = load("tokenizer");
    tok.chat_template = None;
    let err = apply_chat_template(&tok, &user("hi"), true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no chat template"), "{err}");
}

#[test]
fn raise_exception_is_an_error_with_the_message() {
    let src = "{% if messages[0]['role'] != 'system' %}\
               {{ raise_exception('System message required, got ' + messages[0]['role']) }}\
               {% endif %}ok";
    let err = render(src, &user("hi"), json!({})).unwrap_err().to_string();
    assert!(err.starts_with("chat template"), "{err}");
    assert!(err.contains("System message required, got user"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
    // The same template renders when the condition does not hold.
    let ok = render(src, &json!([{"role": "system", "content": "s"}]), json!({})).unwrap();
    assert_eq!(ok, "ok");
}

#[test]
fn syntax_error_fails_at_compile_time() {
    let err = ChatTemplate::new(
        "line one\n{% for m in messages %}{{ m.content }",
        None,
        None,
    )
    .err()
    .expect("broken template must not compile")
    .to_string();
    assert!(err.starts_with("chat template"), "{err}");
    assert!(err.contains("syntax error"), "{err}");
    assert!(err.contains("line 2"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
}

#[test]
fn render_error_is_one_line() {
    let err = render(
        "{{ messages[0].content.no_such_method() }}",
        &user("hi"),
        json!({}),
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("chat template"), "{err}");
    assert!(err.contains("no_such_method"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
}

#[test]
fn bad_messages_are_errors() {
    let t = ChatTemplate::new("{{ messages }}", None, None).unwrap();
    assert!(t
        .render(&json!([]), false)
        .unwrap_err()
        .to_string()
        .contains("empty conversation"));
    assert!(t.render(&json!(["not a message"]), false).is_err());
    assert!(t.render(&json!({"role": "user"}), false).is_err());
}

#[test]
fn tojson_matches_python_json_dumps() {
    let x = json!({
        "z": [1, 2],
        "a": "é",
        "c": {"d": null, "e": 1.5, "f": true, "g": "q\"\n<&>\u{1}"},
        "n": 1e-5,
        "big": 1e16,
        "empty": [],
        "eo": {}
    });
    let out = render("{{ x | tojson }}", &user("hi"), json!({ "x": x })).unwrap();
    assert_eq!(
        out,
        r#"{"z": [1, 2], "a": "é", "c": {"d": null, "e": 1.5, "f": true, "g": "q\"\n<&>\u0001"}, "n": 1e-05, "big": 1e+16, "empty": [], "eo": {}}"#
    );
}

#[test]
fn tojson_indent_and_options() {
    let x = json!({"a": [1, 2], "b": "é", "c": {}, "d": []});
    let out = render("{{ x | tojson(indent=2) }}", &user("hi"), json!({ "x": x })).unwrap();
    assert_eq!(
        out,
        "{\n  \"a\": [\n    1,\n    2\n  ],\n  \"b\": \"é\",\n  \"c\": {},\n  \"d\": []\n}"
    );
    let src = "{{ x | tojson(ensure_ascii=True, sort_keys=True, separators=(',', ':')) }}";
    let out = render(src, &user("hi"), json!({"x": {"b": "é🤖", "a": 1}})).unwrap();
    assert_eq!(out, r#"{"a":1,"b":"\u00e9\ud83e\udd16"}"#);
    // Messages keep their key order too.
    let out = render(
        "{{ messages[0] | tojson }}",
        &json!([{"role": "user", "content": "c", "a": 1}]),
        json!({}),
    )
    .unwrap();
    assert_eq!(out, r#"{"role": "user", "content": "c", "a": 1}"#);
}

#[test]
fn values_print_as_python_does() {
    let src = "{{ true }} {{ none }} {{ [1, 'a', none, 2.0] }} {{ {'k': false, \"it's\": (1,)} }} \
               {{ 1e-05 }} {{ 10 / 4 }} {{ 7 // 2 }} {{ true | string }}";
    let out = render(src, &user("hi"), json!({})).unwrap();
    assert_eq!(
        out,
        r#"True None [1, 'a', None, 2.0] {'k': False, "it's": (1,)} 1e-05 2.5 3 True"#
    );
}

#[test]
fn undefined_is_lenient_like_jinja2() {
    let src = "[{{ nothing }}]{% if nothing is defined %}yes{% else %}no{% endif %}[{{ messages[0].missing }}]\
               {% for x in nothing %}never{% endfor %}";
    assert_eq!(render(src, &user("hi"), json!({})).unwrap(), "[]no[]");
}

#[test]
fn special_tokens_tools_and_documents() {
    let src =
        "{{ bos_token is defined }} {{ tools is none }} {{ documents is none }} {{ eos_token }}";
    let t = ChatTemplate::new(src, None, Some("</s>")).unwrap();
    assert_eq!(
        t.render(&user("hi"), false).unwrap(),
        "False True True </s>"
    );
    let mut extra = Map::new();
    extra.insert("tools".into(), json!([{"name": "f"}]));
    extra.insert("bos_token".into(), json!("<s>"));
    assert_eq!(
        t.render_with(&user("hi"), false, &extra).unwrap(),
        "True False True </s>"
    );
    extra.insert("messages".into(), json!([]));
    assert!(t.render_with(&user("hi"), false, &extra).is_err());
}

#[test]
fn add_generation_prompt_variable() {
    let t = ChatTemplate::new(
        "{% if add_generation_prompt %}GEN{% else %}NO{% endif %}",
        None,
        None,
    )
    .unwrap();
    assert_eq!(t.render(&user("hi"), true).unwrap(), "GEN");
    assert_eq!(t.render(&user("hi"), false).unwrap(), "NO");
}

#[test]
fn messages_are_normalized_like_transformers() {
    // Keys holding null are dropped.
    let src = "{% if 'tool_calls' in messages[0] %}has{% else %}none{% endif %}";
    let msgs = json!([{"role": "user", "content": "hi", "tool_calls": null}]);
    assert_eq!(render(src, &msgs, json!({})).unwrap(), "none");
    // Reasoning is aliased to `thinking` (first) and `reasoning_content` (last).
    let src = "{{ messages[0] | list | join(',') }}|{{ messages[0].thinking }}|{{ messages[0].reasoning_content }}";
    let msgs = json!([{"role": "assistant", "content": "x", "reasoning": "r"}]);
    assert_eq!(
        render(src, &msgs, json!({})).unwrap(),
        "thinking,role,content,reasoning,reasoning_content|r|r"
    );
}

#[test]
fn python_methods_work() {
    let src = "{{ messages[0].content.strip().startswith('hi') }}\
               {% for k, v in messages[0].items() %};{{ k }}={{ v }}{% endfor %};{{ messages[0].get('x', 'dflt') }}";
    let out = render(src, &user("  hi there "), json!({})).unwrap();
    assert_eq!(out, "True;role=user;content=  hi there ;dflt");
}

#[test]
fn trim_blocks_lstrip_blocks_and_loop_controls() {
    let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}\n";
    assert_eq!(render(src, &user("hi"), json!({})).unwrap(), "U:hi\n");
    let src = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}";
    let msgs = json!([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]);
    assert_eq!(render(src, &msgs, json!({})).unwrap(), "user");
}

#[test]
fn template_newlines_are_normalized_like_jinja2() {
    // jinja2 writes "\n" for every newline of the template source (but not of the data).
    let src = "{% if true %}\r\nwin\r\n{% endif %}{{ messages[0].content }}\r\n";
    assert_eq!(
        render(src, &user("a\r\nb"), json!({})).unwrap(),
        "win\na\r\nb"
    );
}

#[test]
fn generation_tags_render_their_body() {
    let src =
        "{% for m in messages %}{%- generation -%}\n{{ m.content }}{% endgeneration %}{% endfor %}";
    assert_eq!(render(src, &user("hi"), json!({})).unwrap(), "hi");
}

#[test]
fn strftime_now_gives_the_year() {
    let out = render("{{ strftime_now('%Y') }}", &user("hi"), json!({})).unwrap();
    assert_eq!(out.len(), 4, "{out}");
    assert!(out.bytes().all(|b| b.is_ascii_digit()), "{out}");
    assert!(out.as_str() >= "2024", "{out}");
    let out = render("{{ strftime_now('%d %b %Y') }}", &user("hi"), json!({})).unwrap();
    assert_eq!(out.len(), 11, "{out}");
}

/// The published chat templates of Qwen3, Gemma 2/3, Phi-3, Phi-4-mini and Llama 3.2 (their own
/// bytes, tests/fixtures/chat-templates/README.md says from where) render as transformers'
/// `apply_chat_template` does, raising where it raises (made by scripts/make_template_goldens.py).
#[test]
fn published_templates_of_the_new_families_render_as_transformers_does() {
    let dir = crate::common::fixture("chat-templates");
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let mut checked = 0;
    for (name, entry) in golden.as_object().unwrap() {
        let file = entry["template_file"].as_str().unwrap();
        let source = std::fs::read_to_string(dir.join(file)).unwrap();
        let template = ChatTemplate::new(
            &source,
            entry["bos_token"].as_str(),
            entry["eos_token"].as_str(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        for case in entry["cases"].as_array().unwrap() {
            let what = format!("{name} / {}", case["name"].as_str().unwrap());
            let extra = case["extra"].as_object().cloned().unwrap_or_default();
            let agp = case["add_generation_prompt"].as_bool().unwrap();
            let got = template.render_with(&case["messages"], agp, &extra);
            match case.get("error").and_then(Value::as_str) {
                Some(err) => {
                    let e = got.expect_err(&what).to_string();
                    assert!(e.contains(err), "{what}: error `{e}` lacks `{err}`");
                    assert!(!e.contains('\n'), "{what}: one line: {e}");
                }
                None => assert_eq!(
                    got.unwrap_or_else(|e| panic!("{what}: {e}")),
                    case["text"].as_str().unwrap(),
                    "{what}"
                ),
            }
            checked += 1;
        }
    }
    assert!(checked >= 40, "{checked} cases");
}

/// A template that loops without end or prints without bound fails fast, naming where it came
/// from, instead of hanging data preparation or exhausting memory.
#[test]
fn templates_that_loop_or_print_without_end_are_refused_quickly() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, _) = load("tokenizer");
    let cases = [
        (
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            "budget",
        ),
        (
            "{% for a in range(10000) %}{% for b in range(10000) %}{{ 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx' }}{% endfor %}{% endfor %}",
            "more than 16 MB",
        ),
    ];
    for (i, (source, what)) in cases.iter().enumerate() {
        let dir = tmp.path().join(format!("t{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        tok.inner.save(dir.join("tokenizer.json"), false).unwrap();
        std::fs::write(dir.join("chat_template.jinja"), source).unwrap();
        let hostile = Tokenizer::from_hf_dir(&dir).unwrap();
        let t0 = std::time::Instant::now();
        let err = rlhf::text::chat_template::render_chat(&hostile, &user("hi"), true).unwrap_err();
        let msg = rlhf::io::one_line_error(&err);
        assert!(
            t0.elapsed().as_secs_f64() < 3.0,
            "{what}: took {:?}",
            t0.elapsed()
        );
        assert!(msg.contains(what), "{msg}");
        assert!(msg.contains("chat_template.jinja"), "{msg}");
    }
}
