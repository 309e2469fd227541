//! The "alignment tax" stand-ins: perplexity on held-out text, and a LAMBADA-style cloze — does
//! the model's greedy continuation of a sentence's context reproduce its last word exactly?

use anyhow::Result;

use crate::data::sft::Example;
use crate::model::{CausalLm, StepInputs};
use crate::text::Tokenizer;
use crate::train::lm_loss::target_nll_sum;

/// exp(mean negative log-likelihood per target token).
pub fn perplexity(model: &CausalLm, examples: &[Example], batch: usize) -> Result<f64> {
    let (mut nll, mut n) = (0.0f64, 0usize);
    for chunk in examples.chunks(batch.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let (s, k) = target_nll_sum(model, &refs)?;
        nll += s.to_scalar::<f32>()? as f64;
        n += k;
    }
    Ok((nll / n.max(1) as f64).exp())
}

/// A context and the token ids of its last word (with its leading space).
pub struct ClozeItem {
    pub context: Vec<u32>,
    pub target: Vec<u32>,
}

/// Cloze items from text: each sentence of at least `min_words` words whose last word is
/// alphabetic (3+ letters). The target's tokens must continue the context's tokens exactly
/// (else the item is skipped), so greedy decoding can be checked token by token.
pub fn cloze_items(texts: &[String], tok: &Tokenizer, min_words: usize) -> Result<Vec<ClozeItem>> {
    let mut out = vec![];
    for text in texts {
        for sentence in text.split_inclusive(['.', '!', '?']) {
            let words: Vec<&str> = sentence.split_whitespace().collect();
            if words.len() < min_words {
                continue;
            }
            let last = words[words.len() - 1].trim_end_matches(['.', '!', '?', ',', '"', '\'']);
            if last.len() < 3 || !last.chars().all(|c| c.is_ascii_alphabetic()) {
                continue;
            }
            let context = words[..words.len() - 1].join(" ");
            let ctx = tok.encode(&context, true)?;
            let full = tok.encode(&format!("{context} {last}"), true)?;
            if full.len() > ctx.len() && full[..ctx.len()] == ctx[..] {
                out.push(ClozeItem {
                    target: full[ctx.len()..].to_vec(),
                    context: ctx,
                });
            }
        }
    }
    Ok(out)
}

/// Share of items whose every target token is the model's argmax given the tokens before it.
pub fn cloze_accuracy(model: &CausalLm, items: &[ClozeItem], batch: usize) -> Result<f64> {
    let mut right = 0usize;
    for chunk in items.chunks(batch.max(1)) {
        let seqs: Vec<Vec<u32>> = chunk
            .iter()
            .map(|c| c.context.iter().chain(&c.target).copied().collect())
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let inp = StepInputs::right_padded(&model.config, &refs)?;
        let hidden = model.forward_hidden(&inp, None)?;
        for (b, c) in chunk.iter().enumerate() {
            let start = c.context.len() - 1;
            let rows = hidden.get(b)?.narrow(0, start, c.target.len())?;
            let logits = model.logits(&rows)?;
            let best: Vec<u32> = logits.argmax(1)?.to_vec1::<u32>()?;
            right += usize::from(best == c.target);
        }
    }
    Ok(right as f64 / items.len().max(1) as f64)
}
