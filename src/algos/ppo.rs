//! PPO for language models (Ziegler et al., 2019; InstructGPT §3.5). A prompt x and one sampled
//! response y = (y_1 … y_T) form a bandit episode:
//!
//!   r_t = −β·(log π_old(y_t|·) − log π_ref(y_t|·))  + [t = T]·score(x, y)
//!   δ_t = r_t + γ·V(s_{t+1}) − V(s_t),  A_t = Σ_k (γλ)^k δ_{t+k},  R_t = A_t + V(s_t)
//!   L_policy = E_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε, 1+ε)),  ρ_t = π(y_t|·) / π_old(y_t|·)
//!   L_value  = ½·E_t max((V − R_t)², (V_old + clip(V − V_old, ±ε_v) − R_t)²)
//!
//! β is fixed or follows Ziegler's proportional controller toward a target KL. PPO-ptx adds
//! γ_ptx times the language-modelling loss on pretraining text to the same step (the loop's job).

use anyhow::Result;
use candle_core::Tensor;

/// Per-token rewards of one episode (KL penalty on every token, the score on the last).
pub fn token_rewards(logp: &[f32], ref_logp: &[f32], score: f32, beta: f64) -> Vec<f32> {
    let mut r: Vec<f32> = logp
        .iter()
        .zip(ref_logp)
        .map(|(&p, &q)| (-beta * (p - q) as f64) as f32)
        .collect();
    if let Some(last) = r.last_mut() {
        *last += score;
    }
    r
}

/// Generalised advantage estimation over one episode. `values[t]` is V of the state before token
/// t; the state after the last token is terminal (V = 0). Returns (advantages, returns).
pub fn gae(rewards: &[f32], values: &[f32], gamma: f64, lam: f64) -> (Vec<f32>, Vec<f32>) {
    let n = rewards.len();
    let mut adv = vec![0f32; n];
    let mut next_adv = 0f64;
    for t in (0..n).rev() {
        let next_value = if t + 1 < n { values[t + 1] as f64 } else { 0.0 };
        let delta = rewards[t] as f64 + gamma * next_value - values[t] as f64;
        next_adv = delta + gamma * lam * next_adv;
        adv[t] = next_adv as f32;
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, returns)
}

/// Whitens every value of every episode together: (x − mean) / std.
pub fn whiten(xs: &mut [Vec<f32>]) {
    let n: usize = xs.iter().map(Vec::len).sum();
    if n < 2 {
        return;
    }
    let mean = xs.iter().flatten().map(|&x| x as f64).sum::<f64>() / n as f64;
    let var = xs
        .iter()
        .flatten()
        .map(|&x| (x as f64 - mean).powi(2))
        .sum::<f64>()
        / (n - 1) as f64;
    let std = (var + 1e-8).sqrt();
    for x in xs.iter_mut().flatten() {
        *x = ((*x as f64 - mean) / std) as f32;
    }
}

/// Sums over the masked tokens of a micro-batch (the caller divides by the minibatch's token
/// count, so accumulation equals one large batch).
pub struct SurrogateSums {
    pub loss: Tensor,
    pub clipped: f64,
    pub approx_kl: f64,
    pub ratio: f64,
}

/// The clipped surrogate. All inputs [N, T]; `mask` marks response tokens.
pub fn policy_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    clip: f64,
) -> Result<SurrogateSums> {
    let log_ratio = (logp - old_logp)?;
    let ratio = log_ratio.exp()?;
    let unclipped = (advantages.neg()? * &ratio)?;
    let clipped = (advantages.neg()? * ratio.clamp(1.0 - clip, 1.0 + clip)?)?;
    let loss = (unclipped.maximum(&clipped)? * mask)?.sum_all()?;
    let masked_sum = |t: &Tensor| -> Result<f64> {
        Ok((t.detach() * mask)?.sum_all()?.to_scalar::<f32>()? as f64)
    };
    Ok(SurrogateSums {
        loss,
        clipped: masked_sum(&clipped.gt(&unclipped)?.to_dtype(candle_core::DType::F32)?)?,
        approx_kl: masked_sum(&(log_ratio.sqr()? * 0.5)?)?,
        ratio: masked_sum(&ratio)?,
    })
}

/// The clipped value loss, summed over masked tokens, and how many tokens were clipped.
pub fn value_loss(
    values: &Tensor,
    old_values: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    clip: f64,
) -> Result<(Tensor, f64)> {
    let clipped_v = (old_values + (values - old_values)?.clamp(-clip, clip)?)?;
    let a = (values - returns)?.sqr()?;
    let b = (clipped_v - returns)?.sqr()?;
    let loss = ((a.maximum(&b)? * mask)?.sum_all()? * 0.5)?;
    let clipped = (b.gt(&a)?.to_dtype(candle_core::DType::F32)? * mask)?
        .sum_all()?
        .to_scalar::<f32>()? as f64;
    Ok((loss, clipped))
}

/// β: fixed, or Ziegler et al.'s proportional controller toward `target` KL (nats per episode):
/// β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon) after each batch of n episodes.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct KlController {
    pub beta: f64,
    pub target: Option<f64>,
    pub horizon: f64,
}

impl KlController {
    pub fn update(&mut self, kl: f64, episodes: usize) {
        if let Some(target) = self.target {
            let error = (kl / target - 1.0).clamp(-0.2, 0.2);
            self.beta *= 1.0 + error * episodes as f64 / self.horizon;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn rewards_put_the_score_on_the_last_token() {
        let r = token_rewards(&[-1.0, -2.0, -0.5], &[-1.5, -2.0, -1.0], 2.0, 0.1);
        let want = [-0.05, 0.0, -0.05 + 2.0];
        for (a, b) in r.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{r:?}");
        }
    }

    #[test]
    fn gae_matches_the_recursion_by_hand() {
        let (r, v) = ([0.0f32, 0.0, 1.0], [0.5f32, 0.6, 0.7]);
        let (adv, ret) = gae(&r, &v, 1.0, 0.95);
        let d2 = 1.0 - 0.7;
        let d1 = 0.0 + 0.7 - 0.6;
        let d0 = 0.0 + 0.6 - 0.5;
        let a2 = d2;
        let a1 = d1 + 0.95 * a2;
        let a0 = d0 + 0.95 * a1;
        for (x, y) in adv.iter().zip([a0, a1, a2]) {
            assert!((*x as f64 - y).abs() < 1e-6);
        }
        // λ = 1, γ = 1: the return is the sum of future rewards.
        let (_, ret1) = gae(&r, &v, 1.0, 1.0);
        assert!(ret1.iter().all(|&x| (x - 1.0).abs() < 1e-6), "{ret1:?}");
        assert!((ret[2] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn surrogate_clips_and_its_gradient_vanishes_outside_the_trust_region() {
        let dev = Device::Cpu;
        // Token 0: ratio e^0.5 > 1.2 with A > 0 → clipped, no gradient. Token 1: ratio 1, A < 0.
        let logp = Var::from_vec(vec![0.5f32, 0.0], (1, 2), &dev).unwrap();
        let old = Tensor::zeros((1, 2), candle_core::DType::F32, &dev).unwrap();
        let adv = Tensor::new(&[[1.0f32, -2.0]], &dev).unwrap();
        let mask = Tensor::ones((1, 2), candle_core::DType::F32, &dev).unwrap();
        let s = policy_loss(logp.as_tensor(), &old, &adv, &mask, 0.2).unwrap();
        let want = -1.2 + 2.0;
        assert!((s.loss.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-6);
        assert_eq!(s.clipped, 1.0);
        assert!((s.approx_kl - 0.125).abs() < 1e-6);
        let g = s.loss.backward().unwrap();
        let g = g.get(logp.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        // d/dlogp of −A·ρ at ρ = 1 is −A = 2.
        assert!(
            g[0][0].abs() < 1e-7 && (g[0][1] - 2.0).abs() < 1e-6,
            "{g:?}"
        );
    }

    #[test]
    fn value_loss_takes_the_pessimistic_branch() {
        let dev = Device::Cpu;
        let v = Tensor::new(&[[1.0f32, 0.0]], &dev).unwrap();
        let old = Tensor::new(&[[0.0f32, 0.0]], &dev).unwrap();
        let ret = Tensor::new(&[[2.0f32, 1.0]], &dev).unwrap();
        let mask = Tensor::ones((1, 2), candle_core::DType::F32, &dev).unwrap();
        let (l, clipped) = value_loss(&v, &old, &ret, &mask, 0.2).unwrap();
        // token 0: max((1−2)², (0.2−2)²) = 3.24; token 1: 1.
        assert!((l.to_scalar::<f32>().unwrap() - 0.5 * 4.24).abs() < 1e-5);
        assert_eq!(clipped, 1.0);
    }

    #[test]
    fn adaptive_beta_moves_toward_the_target() {
        let mut c = KlController {
            beta: 0.1,
            target: Some(6.0),
            horizon: 10000.0,
        };
        c.update(12.0, 1000);
        assert!((c.beta - 0.1 * 1.02).abs() < 1e-12);
        c.update(0.0, 1000);
        assert!(c.beta < 0.1 * 1.02);
        let mut fixed = KlController {
            beta: 0.1,
            target: None,
            horizon: 1.0,
        };
        fixed.update(100.0, 10);
        assert_eq!(fixed.beta, 0.1);
    }
}
