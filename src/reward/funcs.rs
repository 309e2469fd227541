//! Reward functions written as code, for GRPO-style runs (`reward_funcs`, `reward_weights`):
//! a verifiable answer against a dataset column, checks of the response's form, DAPO's soft
//! over-length penalty, an external program that answers JSON lines, and their weighted sum. Each is a [`RewardSource`], as VADER, rules
//! and reward models are.

use anyhow::{anyhow, bail, Context, Result};
use regex::Regex;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use super::{Episode, RewardSource};

/// How long an `exec:` reward program may take per answer unless a run says otherwise.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// 1 when the response's final answer equals the prompt record's `column` (numerically when both
/// are numbers, else as trimmed text), else 0. The final answer is what `<answer>…</answer>`
/// holds, else the last `\boxed{…}`, else what follows GSM8K's `####`, else the last number.
pub struct Accuracy {
    column: String,
}

impl Accuracy {
    pub fn new(column: &str) -> Self {
        Accuracy {
            column: column.to_string(),
        }
    }
}

/// The final answer of a response (see [`Accuracy`]); None when it has none.
pub fn final_answer(text: &str) -> Option<String> {
    let between = |open: &str, close: &str| -> Option<String> {
        let start = text.rfind(open)? + open.len();
        let end = text[start..].find(close)? + start;
        Some(text[start..end].trim().to_string())
    };
    if let Some(a) = between("<answer>", "</answer>") {
        return Some(a);
    }
    if let Some(a) = between("\\boxed{", "}") {
        return Some(a);
    }
    if let Some(i) = text.rfind("####") {
        return Some(text[i + 4..].trim().to_string());
    }
    static NUMBER: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    let number =
        NUMBER.get_or_init(|| Regex::new(r"-?\d[\d,]*(?:\.\d+)?").expect("a valid pattern"));
    number
        .find_iter(text)
        .last()
        .map(|m| m.as_str().to_string())
}

fn as_number(s: &str) -> Option<f64> {
    let cleaned: String = s
        .trim()
        .trim_end_matches('.')
        .chars()
        .filter(|c| !matches!(c, ',' | '$' | ' '))
        .collect();
    cleaned.parse::<f64>().ok().filter(|x| x.is_finite())
}

/// Whether a response's answer matches the reference answer.
pub fn answers_match(got: &str, want: &str) -> bool {
    match (as_number(got), as_number(want)) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-6 * b.abs().max(1.0),
        _ => got.trim() == want.trim(),
    }
}

impl RewardSource for Accuracy {
    fn describe(&self) -> String {
        format!(
            "accuracy (1 if the final answer equals the `{}` column)",
            self.column
        )
    }

    fn score(&mut self, episodes: &[Episode]) -> Result<Vec<f32>> {
        episodes
            .iter()
            .map(|e| {
                let want = e
                    .columns
                    .and_then(|c| c.get(&self.column))
                    .with_context(|| {
                        format!(
                            "accuracy: the prompt record has no `{}` column (prompt: {:?})",
                            self.column,
                            e.prompt_text.chars().take(60).collect::<String>()
                        )
                    })?;
                let want = match want {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let hit = final_answer(e.response_text).is_some_and(|a| answers_match(&a, &want));
                Ok(f32::from(u8::from(hit)))
            })
            .collect()
    }
}

/// 1 when the response matches `pattern` from its start (Python's `re.match`, as TRL's format
/// rewards use it), else 0.
pub struct FormatReward {
    name: String,
    pattern: Regex,
}

impl FormatReward {
    pub fn new(name: &str, pattern: &str) -> Result<Self> {
        let pattern =
            Regex::new(pattern).with_context(|| format!("{name}: invalid regular expression"))?;
        Ok(FormatReward {
            name: name.to_string(),
            pattern,
        })
    }

    /// `<think>…</think>` then `<answer>…</answer>`, nothing else (R1's format).
    pub fn think_answer() -> Self {
        FormatReward::new(
            "think_format",
            r"(?s)^<think>.*?</think>\s*<answer>.*?</answer>\s*$",
        )
        .expect("a valid pattern")
    }
}

impl RewardSource for FormatReward {
    fn describe(&self) -> String {
        format!(
            "{} (1 if the response matches /{}/)",
            self.name, self.pattern
        )
    }

    fn score(&mut self, episodes: &[Episode]) -> Result<Vec<f32>> {
        Ok(episodes
            .iter()
            .map(|e| {
                let hit = self
                    .pattern
                    .find(e.response_text)
                    .is_some_and(|m| m.start() == 0);
                f32::from(u8::from(hit))
            })
            .collect())
    }
}

/// DAPO's soft over-length punishment on the response's token count L: 0 up to
/// `max_len − cache`, then falling linearly to −1 at `max_len`, −1 beyond (TRL's
/// `get_soft_overlong_punishment`).
pub struct SoftOverlong {
    pub max_len: usize,
    pub cache: usize,
}

impl SoftOverlong {
    pub fn penalty(&self, len: usize) -> f32 {
        let free = self.max_len.saturating_sub(self.cache);
        if len <= free {
            0.0
        } else if len <= self.max_len {
            (free as f32 - len as f32) / self.cache.max(1) as f32
        } else {
            -1.0
        }
    }
}

impl RewardSource for SoftOverlong {
    fn describe(&self) -> String {
        format!(
            "soft_overlong (0 up to {} tokens, down to −1 at {})",
            self.max_len.saturating_sub(self.cache),
            self.max_len
        )
    }

    fn score(&mut self, episodes: &[Episode]) -> Result<Vec<f32>> {
        Ok(episodes
            .iter()
            .map(|e| self.penalty(e.response_ids.len()))
            .collect())
    }
}

/// A user's program, started once: one JSON line `{"prompt", "completion"}` per response on its
/// stdin, one line `{"reward": x}` back on its stdout per input, each within `timeout`.
pub struct ExecReward {
    command: String,
    timeout: Duration,
    running: Option<Running>,
    /// Lines answered so far (for messages).
    answered: usize,
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<std::io::Result<String>>,
}

impl ExecReward {
    pub fn new(command: &str, timeout: Duration) -> Self {
        ExecReward {
            command: command.to_string(),
            timeout,
            running: None,
            answered: 0,
        }
    }

    fn start(&mut self) -> Result<&mut Running> {
        if self.running.is_none() {
            let mut child = Command::new("sh")
                .arg("-c")
                .arg(&self.command)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .with_context(|| format!("reward `exec:{}`: cannot start", self.command))?;
            let stdin = child.stdin.take().expect("piped");
            let stdout = child.stdout.take().expect("piped");
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut out = BufReader::new(stdout);
                while let Some(line) = read_answer_line(&mut out) {
                    let failed = line.is_err();
                    if tx.send(line).is_err() || failed {
                        break;
                    }
                }
            });
            self.running = Some(Running {
                child,
                stdin,
                lines: rx,
            });
        }
        Ok(self.running.as_mut().expect("started"))
    }

    fn ask(&mut self, request: &str) -> Result<f32> {
        let (cmd, timeout, line_no) = (self.command.clone(), self.timeout, self.answered + 1);
        let r = self.start()?;
        let died = |r: &mut Running| {
            let status = r.child.try_wait().ok().flatten();
            anyhow!(
                "reward `exec:{cmd}` stopped before answering input line {line_no}{}",
                status.map_or(String::new(), |s| format!(" ({s})"))
            )
        };
        if writeln!(r.stdin, "{request}")
            .and_then(|_| r.stdin.flush())
            .is_err()
        {
            return Err(died(r));
        }
        let line = match r.lines.recv_timeout(timeout) {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => bail!("reward `exec:{cmd}`: reading its answer to line {line_no}: {e}"),
            Err(RecvTimeoutError::Disconnected) => return Err(died(r)),
            Err(RecvTimeoutError::Timeout) => bail!(
                "reward `exec:{cmd}` gave no answer to input line {line_no} within {} s",
                timeout.as_secs_f64()
            ),
        };
        self.answered += 1;
        parse_exec_answer(&line, &cmd, line_no)
    }
}

/// An answer line longer than this is an error, not an allocation without end.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// The program's next line (None at the end of its output), refused past [`MAX_ANSWER_BYTES`]
/// or when it is not UTF-8.
fn read_answer_line(out: &mut impl BufRead) -> Option<std::io::Result<String>> {
    use crate::io::{read_line_bounded, BoundedLine};
    let line = match read_line_bounded(out, MAX_ANSWER_BYTES) {
        Ok(None) => return None,
        Err(e) => return Some(Err(e)),
        Ok(Some(BoundedLine::TooLong)) => {
            let e = format!("an answer longer than {MAX_ANSWER_BYTES} bytes");
            return Some(Err(std::io::Error::other(e)));
        }
        Ok(Some(BoundedLine::Line(bytes))) => bytes,
    };
    Some(String::from_utf8(line).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "an answer that is not UTF-8",
        )
    }))
}

/// One answer of an `exec:` reward program: `{"reward": x}` with x finite.
pub fn parse_exec_answer(line: &str, cmd: &str, line_no: usize) -> Result<f32> {
    let shown = || line.chars().take(80).collect::<String>();
    let value: serde_json::Value = serde_json::from_str(line.trim()).map_err(|_| {
        anyhow!(
            "reward `exec:{cmd}`: answer {line_no} is not JSON: {}",
            shown()
        )
    })?;
    match value.get("reward").and_then(serde_json::Value::as_f64) {
        Some(x) if x.is_finite() => Ok(x as f32),
        _ => bail!(
            "reward `exec:{cmd}`: answer {line_no} has no finite number under \"reward\": {}",
            shown()
        ),
    }
}

impl Drop for ExecReward {
    fn drop(&mut self) {
        if let Some(mut r) = self.running.take() {
            drop(r.stdin);
            // A program that ends on EOF gets a moment; one that does not is killed.
            for _ in 0..20 {
                if r.child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
}

impl RewardSource for ExecReward {
    fn describe(&self) -> String {
        format!("exec:{} (JSON lines on stdin and stdout)", self.command)
    }

    fn score(&mut self, episodes: &[Episode]) -> Result<Vec<f32>> {
        episodes
            .iter()
            .map(|e| {
                // The record's columns first, so that "prompt" and "completion" are ours.
                let mut request = e.columns.cloned().unwrap_or_default();
                request.insert("prompt".into(), e.prompt_text.into());
                request.insert("completion".into(), e.response_text.into());
                self.ask(&serde_json::Value::Object(request).to_string())
            })
            .collect()
    }
}

/// Σ_k w_k · r_k over the reward functions; remembers each function's mean over the last batch
/// (TRL's `rewards/<func>/mean`).
pub struct Weighted {
    funcs: Vec<(String, Box<dyn RewardSource>, f64)>,
    last_means: Vec<f64>,
}

impl Weighted {
    pub fn new(funcs: Vec<(String, Box<dyn RewardSource>, f64)>) -> Result<Self> {
        if funcs.is_empty() {
            bail!("reward_funcs is empty");
        }
        let n = funcs.len();
        Ok(Weighted {
            funcs,
            last_means: vec![0.0; n],
        })
    }
}

impl RewardSource for Weighted {
    fn describe(&self) -> String {
        self.funcs
            .iter()
            .map(|(_, f, w)| format!("{w} × {}", f.describe()))
            .collect::<Vec<_>>()
            .join(" + ")
    }

    fn score(&mut self, episodes: &[Episode]) -> Result<Vec<f32>> {
        let mut total = vec![0f64; episodes.len()];
        for (k, (name, f, w)) in self.funcs.iter_mut().enumerate() {
            let r = f.score(episodes)?;
            if r.len() != episodes.len() {
                bail!(
                    "reward function {name} returned {} scores for {} responses",
                    r.len(),
                    episodes.len()
                );
            }
            self.last_means[k] = r.iter().map(|&x| x as f64).sum::<f64>() / r.len().max(1) as f64;
            for (t, x) in total.iter_mut().zip(&r) {
                *t += *w * *x as f64;
            }
        }
        Ok(total.into_iter().map(|x| x as f32).collect())
    }

    fn components(&self) -> Vec<(String, f64)> {
        self.funcs
            .iter()
            .zip(&self.last_means)
            .map(|((name, _, _), &m)| (name.clone(), m))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn episodes<'a>(texts: &'a [&'a str], ids: &'a [Vec<u32>]) -> Vec<Episode<'a>> {
        texts
            .iter()
            .zip(ids)
            .map(|(t, i)| Episode {
                columns: None,
                prompt_ids: &[],
                response_ids: i,
                prompt_text: "p",
                response_text: t,
            })
            .collect()
    }

    #[test]
    fn answer_lines_are_bounded_and_utf8() {
        let mut two = std::io::Cursor::new(b"{\"reward\": 1}\nlast".to_vec());
        assert_eq!(
            read_answer_line(&mut two).unwrap().unwrap(),
            "{\"reward\": 1}"
        );
        assert_eq!(read_answer_line(&mut two).unwrap().unwrap(), "last");
        assert!(read_answer_line(&mut two).is_none());
        let long = vec![b'1'; MAX_ANSWER_BYTES + 1];
        let e = read_answer_line(&mut std::io::Cursor::new(long)).unwrap();
        assert!(e.unwrap_err().to_string().contains("longer than"));
        let e = read_answer_line(&mut std::io::Cursor::new(vec![0xff, b'\n'])).unwrap();
        assert!(e.unwrap_err().to_string().contains("not UTF-8"));
        assert_eq!(
            parse_exec_answer(" {\"reward\": 0.5} ", "p", 1).unwrap(),
            0.5
        );
        for bad in [
            "",
            "{}",
            "{\"reward\": \"1\"}",
            "[1]",
            "{\"reward\": 1e999}",
        ] {
            assert!(parse_exec_answer(bad, "p", 1).is_err(), "{bad}");
        }
    }

    #[test]
    fn format_rewards_match_from_the_start() {
        let ids = vec![vec![]; 4];
        let texts = [
            "<think>a\nb</think> <answer>4</answer>",
            "x<think>a</think><answer>4</answer>",
            "<think>a</think>",
            "<think></think><answer></answer>\n",
        ];
        let r = FormatReward::think_answer()
            .score(&episodes(&texts, &ids))
            .unwrap();
        assert_eq!(r, vec![1.0, 0.0, 0.0, 1.0]);
        let mut f = FormatReward::new("digits", r"\d+").unwrap();
        assert_eq!(
            f.score(&episodes(&["42 is it", "it is 42"], &ids[..2]))
                .unwrap(),
            vec![1.0, 0.0]
        );
        assert!(FormatReward::new("bad", "(").is_err());
    }

    #[test]
    fn accuracy_extracts_the_final_answer_and_compares_numbers() {
        for (text, want) in [
            ("so <answer> 42 </answer>", Some("42")),
            ("it is \\boxed{3.5} done", Some("3.5")),
            ("work\n#### 1,234", Some("1,234")),
            ("3 apples and then 7", Some("7")),
            ("no digits", None),
        ] {
            assert_eq!(final_answer(text).as_deref(), want, "{text}");
        }
        assert!(
            answers_match("1,234", "1234") && answers_match("7.0", "7") && answers_match("$5", "5")
        );
        assert!(
            !answers_match("7", "8")
                && answers_match("Paris", " Paris")
                && !answers_match("paris", "Paris")
        );
        let cols: Vec<serde_json::Map<String, serde_json::Value>> =
            [json!({"answer": 7}), json!({"answer": "12"})]
                .into_iter()
                .map(|v| v.as_object().unwrap().clone())
                .collect();
        let eps: Vec<Episode> = [("3 + 4 = 7", &cols[0]), ("I think 11", &cols[1])]
            .iter()
            .map(|(t, c)| Episode {
                columns: Some(c),
                prompt_ids: &[],
                response_ids: &[],
                prompt_text: "p",
                response_text: t,
            })
            .collect();
        assert_eq!(Accuracy::new("answer").score(&eps).unwrap(), vec![1.0, 0.0]);
        let e = Accuracy::new("solution")
            .score(&eps)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no `solution` column"), "{e}");
    }

    #[test]
    fn soft_overlong_is_dapos_ramp() {
        let s = SoftOverlong {
            max_len: 20,
            cache: 4,
        };
        let got: Vec<f32> = [10, 16, 17, 18, 20, 21]
            .iter()
            .map(|&l| s.penalty(l))
            .collect();
        assert_eq!(got, vec![0.0, 0.0, -0.25, -0.5, -1.0, -1.0]);
    }

    #[test]
    fn weighted_sums_and_remembers_each_mean() {
        let ids = vec![vec![0; 18], vec![0; 2]];
        let texts = ["<think></think><answer>1</answer>", "no"];
        let mut w = Weighted::new(vec![
            (
                "think_format".into(),
                Box::new(FormatReward::think_answer()),
                2.0,
            ),
            (
                "soft_overlong".into(),
                Box::new(SoftOverlong {
                    max_len: 20,
                    cache: 4,
                }),
                1.0,
            ),
        ])
        .unwrap();
        let r = w.score(&episodes(&texts, &ids)).unwrap();
        assert_eq!(r, vec![2.0 - 0.5, 0.0]);
        assert_eq!(
            w.components(),
            vec![
                ("think_format".to_string(), 0.5),
                ("soft_overlong".to_string(), -0.25)
            ]
        );
    }

    #[test]
    fn an_external_program_scores_and_its_failures_are_named() {
        let ids = vec![vec![]; 2];
        let texts = ["abc", "hello world"];
        // Answers the completion's length as the reward.
        let script = r#"while IFS= read -r line; do n=$(printf '%s' "$line" | sed 's/.*"completion":"\([^"]*\)".*/\1/' | wc -c); echo "{\"reward\": $n}"; done"#;
        let mut r = ExecReward::new(script, Duration::from_secs(10));
        assert_eq!(r.score(&episodes(&texts, &ids)).unwrap(), vec![3.0, 11.0]);
        // Garbage, death and silence are errors naming the command and the line.
        let mut bad = ExecReward::new("read l; echo oops", Duration::from_secs(10));
        let e = bad.score(&episodes(&texts, &ids)).unwrap_err().to_string();
        assert!(
            e.contains("exec:read l; echo oops") && e.contains("answer 1 is not JSON"),
            "{e}"
        );
        let mut dies = ExecReward::new("exit 3", Duration::from_secs(10));
        let e = dies.score(&episodes(&texts, &ids)).unwrap_err().to_string();
        assert!(e.contains("stopped before answering input line 1"), "{e}");
        let mut slow = ExecReward::new("sleep 5", Duration::from_millis(200));
        let e = slow.score(&episodes(&texts, &ids)).unwrap_err().to_string();
        assert!(e.contains("no answer to input line 1 within 0.2 s"), "{e}");
    }
}
