//! Did alignment work? Samples from one or more policies on a prompt set, scored by a judge:
//! mean reward, win rate against a baseline (95% Wilson interval), sequence-level KL(π‖π_ref),
//! response length, and the alignment-tax stand-ins (held-out perplexity, last-word cloze).
//! Writes report.md, results.json, samples.jsonl and SVG charts.

pub mod plot;
pub mod stats;
pub mod text;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Instant;

use crate::checkpoint::Checkpoint;
use crate::data::prompts::read_prompts;
use crate::data::sft::{prepare, SftDataConfig};
use crate::generate::{generate, SamplingConfig};
use crate::reward::Episode;
use crate::settings::{KeyDoc, Section};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// "name=path" or "path" (named after the directory).
    pub policies: Vec<String>,
    pub baseline: String,
    pub reference: String,
    pub judge: String,
    pub prompt_file: String,
    pub max_prompts: usize,
    pub chat: bool,
    pub max_prompt_length: usize,
    pub response_length: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub text_file: TextFiles,
    pub max_texts: usize,
    pub cloze_min_words: usize,
    pub batch_size: usize,
    pub output_dir: String,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            policies: vec![],
            baseline: String::new(),
            reference: String::new(),
            judge: String::new(),
            prompt_file: String::new(),
            max_prompts: 0,
            chat: false,
            max_prompt_length: 128,
            response_length: 48,
            temperature: 1.0,
            top_p: 1.0,
            seed: 0,
            text_file: TextFiles::default(),
            max_texts: 200,
            cloze_min_words: 6,
            batch_size: 16,
            output_dir: "eval-out".into(),
        }
    }
}

impl Section for EvalConfig {
    const TITLE: &'static str = "eval";
    const KEYS: &'static [KeyDoc] = &[
        KeyDoc::required("policies", "list of \"name=path\" (or paths) to sample from"),
        KeyDoc::shown("baseline", "first policy", "name of the policy the others' win rates are against"),
        KeyDoc::shown("reference", "baseline's path", "π_ref of the KL estimate").path(),
        KeyDoc::required("judge", "reward-model dir, \"vader\", \"rule:…\", or any of rlhf grpo's reward_funcs (e.g. \"accuracy\": the prompt records' answer column)").path(),
        KeyDoc::required("prompt_file", "prompts {\"prompt\": text or messages}").path(),
        KeyDoc::new("max_prompts", "use the first N prompts (0: all)"),
        KeyDoc::new("chat", "wrap string prompts in the chat template"),
        KeyDoc::new("max_prompt_length", "longer prompts keep their last tokens"),
        KeyDoc::new("response_length", "max new tokens per response"),
        KeyDoc::new("temperature", "sampling temperature (the KL estimate assumes 1)"),
        KeyDoc::new("top_p", "nucleus filter"),
        KeyDoc::new("seed", "sampling seed (the same for every policy)"),
        KeyDoc::new("text_file", "held-out text ({\"text\"} JSONL or .txt) for perplexity and cloze accuracy; a list for several corpora").path(),
        KeyDoc::new("max_texts", "texts used from each text_file"),
        KeyDoc::new("cloze_min_words", "sentences shorter than this are not cloze items"),
        KeyDoc::new("batch_size", "sequences per forward pass"),
        KeyDoc::new("output_dir", "where report.md, results.json, samples.jsonl and the SVG charts go").path(),
    ];
}

/// `text_file`: one held-out corpus, or a list of them (each gets its own perplexity and cloze
/// columns; e.g. the PPO-ptx corpus's held-out part and a corpus no model was trained on).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum TextFiles {
    One(String),
    Many(Vec<String>),
}

impl Default for TextFiles {
    fn default() -> Self {
        TextFiles::One(String::new())
    }
}

impl From<String> for TextFiles {
    fn from(path: String) -> Self {
        TextFiles::One(path)
    }
}

impl TextFiles {
    /// The non-empty paths, in order.
    pub fn paths(&self) -> Vec<&str> {
        match self {
            TextFiles::One(p) => vec![p.as_str()],
            TextFiles::Many(ps) => ps.iter().map(String::as_str).collect(),
        }
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect()
    }
}

/// Perplexity and cloze accuracy of one policy on one held-out corpus.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct TextScores {
    pub file: String,
    pub perplexity: f64,
    pub cloze_accuracy: Option<f64>,
}

/// One policy's row; results.json holds these (JSON writes a NaN as null, read back as NaN).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct PolicyResult {
    pub name: String,
    pub path: String,
    #[serde(deserialize_with = "nan_if_null")]
    pub mean_reward: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub reward_sem: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub win_rate: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub win_low: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub win_high: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub kl: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub response_length: f64,
    /// On the first `text_file` (kept beside `text` so one-corpus readers need not change).
    pub perplexity: Option<f64>,
    pub cloze_accuracy: Option<f64>,
    /// On every `text_file`, in order (absent from reports written before it existed).
    #[serde(default)]
    pub text: Vec<TextScores>,
    pub seconds: f64,
}

fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Redraws the charts of a report directory from its results.json (after renaming policies
/// there, or to get the charts of a newer rlhf), without sampling anything again.
pub fn replot(dir: &Path) -> Result<()> {
    #[derive(Deserialize)]
    struct Saved {
        baseline: String,
        judge: String,
        prompts: usize,
        #[serde(default)]
        corpora: Vec<(String, usize, usize)>,
        results: Vec<PolicyResult>,
    }
    let path = dir.join("results.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let saved: Saved = serde_json::from_str(&text)
        .with_context(|| format!("{}: not the results.json of `rlhf eval`", path.display()))?;
    write_charts(
        &EvalReport {
            baseline: saved.baseline,
            judge: saved.judge,
            prompts: saved.prompts,
            corpora: saved.corpora,
            results: saved.results,
        },
        dir,
    )
}

/// A held-out corpus, prepared once for every policy.
struct Corpus {
    file: String,
    texts: usize,
    examples: Vec<crate::data::sft::Example>,
    cloze: Vec<text::ClozeItem>,
}

pub struct EvalReport {
    pub baseline: String,
    pub judge: String,
    pub prompts: usize,
    /// (file, texts, cloze items) of each held-out corpus.
    pub corpora: Vec<(String, usize, usize)>,
    pub results: Vec<PolicyResult>,
}

impl EvalConfig {
    /// The files and directories the evaluation reads (policies, reference, judge, prompts,
    /// held-out text).
    pub fn input_paths(&self) -> Vec<String> {
        let mut paths: Vec<String> = self.policies.iter().map(|s| split_policy(s).1).collect();
        paths.extend([
            self.reference.clone(),
            self.judge.clone(),
            self.prompt_file.clone(),
        ]);
        paths.extend(self.text_file.paths().iter().map(|p| p.to_string()));
        paths
    }
}

fn split_policy(spec: &str) -> (String, String) {
    match spec.split_once('=') {
        Some((n, p)) if !n.is_empty() && !n.contains('/') => (n.to_string(), p.to_string()),
        _ => {
            let p = spec.trim_end_matches('/');
            let name = Path::new(p)
                .file_name()
                .map_or(p.to_string(), |n| n.to_string_lossy().to_string());
            (name, spec.to_string())
        }
    }
}

fn read_texts(path: &str, limit: usize) -> Result<Vec<String>> {
    let texts: Vec<String> = if path.ends_with(".txt") {
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {path}"))?
            .split("\n\n")
            .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|p| !p.is_empty())
            .collect()
    } else {
        crate::data::read_records(Path::new(path))?
            .into_iter()
            .map(|(line, r)| {
                r.get("text")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .with_context(|| format!("{path}:{line}: expected {{\"text\"}}"))
            })
            .collect::<Result<_>>()?
    };
    Ok(texts.into_iter().take(limit.max(1)).collect())
}

pub fn run_eval(cfg: &EvalConfig) -> Result<EvalReport> {
    if cfg.policies.is_empty() || cfg.judge.is_empty() || cfg.prompt_file.is_empty() {
        bail!("`policies`, `judge` and `prompt_file` are required");
    }
    if cfg.batch_size == 0 {
        bail!("batch_size must be at least 1");
    }
    let policies: Vec<(String, String)> = cfg.policies.iter().map(|s| split_policy(s)).collect();
    let baseline = if cfg.baseline.is_empty() {
        policies[0].0.clone()
    } else {
        cfg.baseline.clone()
    };
    let Some(base_index) = policies.iter().position(|(n, _)| *n == baseline) else {
        bail!("baseline `{baseline}` is not one of the policies");
    };
    let reference_path = if cfg.reference.is_empty() {
        policies[base_index].1.clone()
    } else {
        cfg.reference.clone()
    };
    let reference = Checkpoint::load(&reference_path, false)?;
    let tok = reference.tokenizer()?;
    let (mut prompts, _) = read_prompts(&cfg.prompt_file, tok, cfg.chat, cfg.max_prompt_length)?;
    if cfg.max_prompts > 0 {
        prompts.truncate(cfg.max_prompts);
    }
    let mut judge = crate::reward::from_funcs(
        std::slice::from_ref(&cfg.judge),
        &[],
        tok,
        cfg.batch_size,
        crate::reward::funcs::DEFAULT_EXEC_TIMEOUT,
    )?;
    let corpora = cfg
        .text_file
        .paths()
        .into_iter()
        .map(|file| Corpus::read(file, cfg, &reference))
        .collect::<Result<Vec<_>>>()?;
    let mut bench = Bench {
        cfg,
        reference: &reference,
        reference_path: &reference_path,
        prompts: &prompts,
        judge: judge.as_mut(),
        corpora: &corpora,
    };
    let mut all_scores: Vec<Vec<f32>> = vec![];
    let mut results = vec![];
    let mut sample_lines: Vec<Value> = prompts.iter().map(|p| json!({"prompt": p.text})).collect();
    for (name, path) in &policies {
        let (result, scores, texts) = bench.evaluate(name, path)?;
        for (line, (t, s)) in sample_lines.iter_mut().zip(texts.iter().zip(&scores)) {
            line[name.as_str()] = json!({"response": t, "score": s});
        }
        eprintln!(
            "{name}: reward {:.4} ± {:.4}, KL {:.3}, {:.1}s",
            result.mean_reward, result.reward_sem, result.kl, result.seconds
        );
        results.push(result);
        all_scores.push(scores);
    }
    for (r, s) in results.iter_mut().zip(&all_scores) {
        let (w, lo, hi) = stats::win_rate(s, &all_scores[base_index]);
        (r.win_rate, r.win_low, r.win_high) = (w, lo, hi);
    }
    let report = EvalReport {
        baseline,
        judge: judge.describe(),
        prompts: prompts.len(),
        corpora: corpora
            .iter()
            .map(|c| (c.file.clone(), c.texts, c.cloze.len()))
            .collect(),
        results,
    };
    let out = Path::new(&cfg.output_dir);
    write_report(&report, cfg, out)?;
    let samples_text: String = sample_lines.iter().map(|l| l.to_string() + "\n").collect();
    crate::io::write_atomic(&out.join("samples.jsonl"), samples_text.as_bytes())?;
    Ok(report)
}

impl Corpus {
    /// Held-out text for perplexity (cut to the reference's positions, at most 512 tokens) and
    /// its cloze items.
    fn read(file: &str, cfg: &EvalConfig, reference: &Checkpoint) -> Result<Corpus> {
        let tok = reference.tokenizer()?;
        let texts = read_texts(file, cfg.max_texts)?;
        let records: Vec<(usize, Value)> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| (i + 1, json!({ "text": t })))
            .collect();
        let max_length = reference.model.config.max_position_embeddings.min(512);
        let data = SftDataConfig {
            max_length,
            ..Default::default()
        };
        Ok(Corpus {
            file: file.to_string(),
            texts: texts.len(),
            examples: prepare(&records, file, tok, &data)?.0,
            cloze: text::cloze_items(&texts, tok, cfg.cloze_min_words)?,
        })
    }
}

/// What every policy is measured against: the same prompts, seed, judge, reference and text.
struct Bench<'a> {
    cfg: &'a EvalConfig,
    reference: &'a Checkpoint,
    reference_path: &'a str,
    prompts: &'a [crate::data::prompts::Prompt],
    judge: &'a mut dyn crate::reward::RewardSource,
    corpora: &'a [Corpus],
}

impl Bench<'_> {
    /// One policy's samples, scores, KL to the reference and text measures; returns its result
    /// (win rate filled in later), its scores and its responses.
    fn evaluate(
        &mut self,
        name: &str,
        path: &str,
    ) -> Result<(PolicyResult, Vec<f32>, Vec<String>)> {
        let (cfg, tok) = (self.cfg, self.reference.tokenizer()?);
        let t = Instant::now();
        let ck = Checkpoint::load(path, false)?;
        if ck.model.config.vocab_size != self.reference.model.config.vocab_size {
            bail!(
                "{path}: its vocabulary differs from the reference's ({})",
                self.reference_path
            );
        }
        let sampling = SamplingConfig {
            max_new_tokens: cfg.response_length,
            temperature: cfg.temperature,
            top_k: 0,
            top_p: cfg.top_p,
            stop_ids: self.reference.stop_token_ids(),
            seed: cfg.seed,
            // A finished row's place goes to the next prompt.
            max_rows: cfg.batch_size * 4,
            ..Default::default()
        };
        let prompt_ids: Vec<Vec<u32>> = self.prompts.iter().map(|p| p.ids.clone()).collect();
        let samples = generate(&ck.model, &prompt_ids, &sampling)?;
        let bodies: Vec<&[u32]> = samples.iter().map(|s| s.response()).collect();
        let texts: Vec<String> = bodies
            .iter()
            .map(|b| tok.decode(b, true))
            .collect::<Result<_>>()?;
        let episodes: Vec<Episode> = samples
            .iter()
            .zip(self.prompts)
            .zip(bodies.iter().zip(&texts))
            .map(|((s, p), (b, t))| Episode {
                columns: Some(&p.columns),
                prompt_ids: &s.prompt,
                response_ids: b,
                prompt_text: &p.text,
                response_text: t,
            })
            .collect();
        let scores = self.judge.score(&episodes)?;
        if let Some(i) = scores.iter().position(|x| !x.is_finite()) {
            bail!(
                "the judge returned {} for a response of {name}: {:?}",
                scores[i],
                texts[i]
            );
        }
        let ref_lps = self.reference_logprobs(&samples)?;
        let pol_lps: Vec<Vec<f32>> = samples.iter().map(|s| s.model_logprobs.clone()).collect();
        let kl = stats::sequence_kl(&pol_lps, &ref_lps);
        let (mean_reward, reward_sem) = stats::mean_sem(&scores);
        let mut text_scores = vec![];
        for c in self.corpora {
            text_scores.push(TextScores {
                file: c.file.clone(),
                perplexity: text::perplexity(&ck.model, &c.examples, cfg.batch_size)?,
                cloze_accuracy: if c.cloze.is_empty() {
                    None
                } else {
                    Some(text::cloze_accuracy(&ck.model, &c.cloze, cfg.batch_size)?)
                },
            });
        }
        let result = PolicyResult {
            name: name.to_string(),
            path: path.to_string(),
            mean_reward,
            reward_sem,
            win_rate: f64::NAN,
            win_low: f64::NAN,
            win_high: f64::NAN,
            kl,
            response_length: samples.iter().map(|s| s.tokens.len() as f64).sum::<f64>()
                / samples.len().max(1) as f64,
            perplexity: text_scores.first().map(|t| t.perplexity),
            cloze_accuracy: text_scores.first().and_then(|t| t.cloze_accuracy),
            text: text_scores,
            seconds: t.elapsed().as_secs_f64(),
        };
        Ok((result, scores, texts))
    }

    /// Reference log-probs of exactly the sampled tokens.
    fn reference_logprobs(&self, samples: &[crate::generate::Sample]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(samples.len());
        for chunk in samples.chunks(self.cfg.batch_size) {
            let seqs: Vec<Vec<u32>> = chunk
                .iter()
                .map(|s| s.prompt.iter().chain(&s.tokens).copied().collect())
                .collect();
            let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
            let starts: Vec<usize> = chunk.iter().map(|s| s.prompt.len()).collect();
            let (lp, _, _) = self.reference.model.completion_logprobs(
                &refs,
                &starts,
                crate::ops::default_path(),
            )?;
            let rows = lp.to_vec2::<f32>()?;
            for ((r, s), st) in rows.into_iter().zip(&seqs).zip(&starts) {
                out.push(r[st - 1..s.len() - 1].to_vec());
            }
        }
        Ok(out)
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |x| format!("{x:.digits$}"))
}

/// A name made of letters, digits, `-` and `_` only (the rest become `_`), for file names.
fn file_safe(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The reward-vs-perplexity chart of the `i`-th held-out corpus: `reward_vs_perplexity` for the
/// first, `reward_vs_perplexity_<name>` for the others.
fn perplexity_chart(i: usize, label: &str) -> String {
    match i {
        0 => "reward_vs_perplexity".into(),
        _ => format!("reward_vs_perplexity_{}", file_safe(label)),
    }
}

/// A corpus's short name for column headers: its file stem.
fn corpus_label(file: &str) -> String {
    Path::new(file)
        .file_stem()
        .map_or(file.to_string(), |s| s.to_string_lossy().to_string())
}

/// The Markdown table of a report: one perplexity and one cloze column per held-out corpus
/// (named after the file when there are several).
pub fn table(report: &EvalReport) -> String {
    let text_headers: Vec<String> = match report.corpora.len() {
        0 | 1 => vec!["perplexity".into(), "cloze acc.".into()],
        _ => report
            .corpora
            .iter()
            .flat_map(|(f, _, _)| {
                let l = corpus_label(f);
                [format!("perplexity {l}"), format!("cloze {l}")]
            })
            .collect(),
    };
    let mut s = format!(
        "| policy | reward (± s.e.) | win rate vs {} [95% CI] | KL(π‖π_ref) nats | response tokens | {} |\n|---|---:|---:|---:|---:|{}\n",
        report.baseline,
        text_headers.join(" | "),
        "---:|".repeat(text_headers.len())
    );
    for r in &report.results {
        let text_cells: Vec<String> = if r.text.is_empty() {
            vec!["–".into(), "–".into()]
        } else {
            r.text
                .iter()
                .flat_map(|t| [opt(Some(t.perplexity), 2), opt(t.cloze_accuracy, 3)])
                .collect()
        };
        s.push_str(&format!(
            "| {} | {:.4} ± {:.4} | {:.3} [{:.3}, {:.3}] | {:.3} | {:.1} | {} |\n",
            r.name,
            r.mean_reward,
            r.reward_sem,
            r.win_rate,
            r.win_low,
            r.win_high,
            r.kl,
            r.response_length,
            text_cells.join(" | ")
        ));
    }
    s
}

fn write_report(report: &EvalReport, cfg: &EvalConfig, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let md = format!(
        "# Evaluation\n\nJudge: {}. {} prompts from `{}`, one sample each (temperature {}, up to {} new tokens, seed {}). \
         Win rate: share of prompts where the policy's response scores higher than {}'s (ties ½), with the Wilson 95% interval. \
         KL: mean over the policy's own samples of Σ_t log π − log π_ref (π_ref = `{}`), in nats per response.{}\n\n{}\n![reward vs KL](reward_vs_kl.svg)\n![win rate](win_rate.svg)\n{}",
        report.judge,
        report.prompts,
        cfg.prompt_file,
        cfg.temperature,
        cfg.response_length,
        cfg.seed,
        report.baseline,
        if cfg.reference.is_empty() { &report.baseline } else { &cfg.reference },
        report
            .corpora
            .iter()
            .map(|(file, texts, items)| format!(
                " Perplexity on {texts} held-out texts and last-word cloze accuracy on {items} sentences of `{file}`."
            ))
            .collect::<String>(),
        table(report),
        report
            .corpora
            .iter()
            .enumerate()
            .map(|(i, (file, _, _))| {
                let l = corpus_label(file);
                format!("![reward vs perplexity on {l}]({}.svg)\n", perplexity_chart(i, &l))
            })
            .collect::<String>()
    );
    crate::io::write_atomic(&out.join("report.md"), md.as_bytes())?;
    crate::io::write_atomic(
        &out.join("results.json"),
        serde_json::to_string_pretty(&json!({
            "baseline": report.baseline,
            "judge": report.judge,
            "prompts": report.prompts,
            "corpora": report.corpora,
            "results": report.results,
        }))?
        .as_bytes(),
    )?;
    write_charts(report, out)
}

/// reward_vs_kl, win_rate and (with held-out text) reward_vs_perplexity, each as SVG and PNG.
pub fn write_charts(report: &EvalReport, out: &Path) -> Result<()> {
    let points: Vec<(String, String, f64, f64)> = report
        .results
        .iter()
        .map(|r| (method_of(&r.name), r.name.clone(), r.kl, r.mean_reward))
        .collect();
    write_chart(
        out,
        "reward_vs_kl",
        &plot::scatter(
            "Reward vs KL to the reference",
            "KL(π‖π_ref), nats per response",
            "mean reward (judge)",
            &points,
        ),
    )?;
    // The alignment tax against the gain: reward vs perplexity, one chart per held-out corpus.
    // Reports written before `text` existed hold only the first corpus's `perplexity`.
    let mut corpora: Vec<(String, Vec<Option<f64>>)> = report
        .corpora
        .iter()
        .enumerate()
        .map(|(i, (file, _, _))| {
            let per_policy = report
                .results
                .iter()
                .map(|r| r.text.get(i).map(|t| t.perplexity))
                .collect();
            (corpus_label(file), per_policy)
        })
        .collect();
    if corpora.is_empty() && report.results.iter().any(|r| r.perplexity.is_some()) {
        let per_policy = report.results.iter().map(|r| r.perplexity).collect();
        corpora.push(("held-out text".into(), per_policy));
    }
    for (i, (label, perplexities)) in corpora.iter().enumerate() {
        let points: Vec<(String, String, f64, f64)> = report
            .results
            .iter()
            .zip(perplexities)
            .filter_map(|(r, p)| Some((method_of(&r.name), r.name.clone(), (*p)?, r.mean_reward)))
            .collect();
        write_chart(
            out,
            &perplexity_chart(i, label),
            &plot::scatter(
                "Reward vs held-out perplexity (the alignment tax)",
                &format!("perplexity on {label} (lower is better)"),
                "mean reward (judge)",
                &points,
            ),
        )?;
    }
    let bars: Vec<(String, f64, f64, f64)> = report
        .results
        .iter()
        .map(|r| (r.name.clone(), r.win_rate, r.win_low, r.win_high))
        .collect();
    write_chart(
        out,
        "win_rate",
        &plot::bars(
            &format!("Win rate vs {} (95% Wilson interval)", report.baseline),
            "win rate",
            &bars,
            Some(0.5),
        ),
    )
}

/// The method a policy name stands for, so a sweep shares one colour in the reward-vs-KL plot:
/// a last `-`-separated part holding a digit is the setting ("dpo-beta0.1" → "dpo",
/// "ppo-rm-kl0.02" → "ppo-rm"); other names are their own method ("ppo-gt", "sft").
fn method_of(name: &str) -> String {
    match name.rsplit_once('-') {
        Some((method, setting)) if setting.chars().any(|c| c.is_ascii_digit()) => method.into(),
        _ => name.into(),
    }
}

/// `<name>.svg` and its PNG rendering `<name>.png`.
pub fn write_chart(out: &std::path::Path, name: &str, svg: &str) -> Result<()> {
    crate::io::write_atomic(&out.join(format!("{name}.svg")), svg.as_bytes())?;
    crate::io::write_atomic(&out.join(format!("{name}.png")), &plot::png(svg)?)
}

#[cfg(test)]
mod method_tests {
    use super::method_of;

    #[test]
    fn sweeps_share_a_method() {
        assert_eq!(method_of("dpo-beta0.1"), "dpo");
        assert_eq!(method_of("ppo-rm-kl0.02"), "ppo-rm");
        assert_eq!(method_of("ppo-gt"), "ppo-gt");
        assert_eq!(method_of("sft"), "sft");
    }
}
