//! Choosing the next token from a step's logits: greedy (the largest logit), or sampling at a
//! temperature from the smallest set of tokens whose probabilities add up to `top_p`
//! (nucleus sampling), from a seeded ChaCha8 generator so a seed replays the same tokens.
//!
//! It must not run models: [`Sampler::next`] takes logits, `crate::generate` calls it.

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How the next token is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Sampling {
    /// The largest logit; ties go to the lowest id.
    #[default]
    Greedy,
    /// Softmax of `logits / temperature`, cut to the most probable tokens whose probabilities
    /// reach `top_p`, drawn from ChaCha8 seeded with `seed`.
    TopP {
        temperature: f32,
        top_p: f32,
        seed: u64,
    },
}

impl Sampling {
    /// The sampling the `--temperature`, `--top-p` and `--seed` flags ask for: greedy at
    /// temperature 0 (then `top_p` must be 1, its default), else [`Sampling::TopP`]. Errors
    /// name the flag and what it takes.
    pub fn from_flags(temperature: f32, top_p: f32, seed: u64) -> Result<Sampling> {
        if !temperature.is_finite() || temperature < 0.0 {
            bail!("--temperature {temperature}: expected a number ≥ 0 (0 is greedy)");
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            bail!("--top-p {top_p}: expected a number in (0, 1]");
        }
        if temperature == 0.0 {
            if top_p < 1.0 {
                bail!("--top-p {top_p} needs a --temperature above 0 (temperature 0 is greedy)");
            }
            return Ok(Sampling::Greedy);
        }
        Ok(Sampling::TopP {
            temperature,
            top_p,
            seed,
        })
    }
}

/// Picks tokens from logits, one step after another.
#[derive(Clone, Debug)]
pub struct Sampler {
    sampling: Sampling,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Sampler {
        let seed = match sampling {
            Sampling::TopP { seed, .. } => seed,
            Sampling::Greedy => 0,
        };
        Sampler {
            sampling,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x73616d706c65),
        }
    }

    /// The next token. Empty or NaN logits are an error.
    pub fn next(&mut self, logits: &[f32]) -> Result<i32> {
        if logits.is_empty() {
            bail!("the logits are empty");
        }
        if let Some(i) = logits.iter().position(|v| v.is_nan()) {
            bail!("logit {i} is NaN");
        }
        let (temperature, top_p) = match self.sampling {
            Sampling::Greedy => return crate::generate::argmax(logits),
            Sampling::TopP {
                temperature, top_p, ..
            } => (temperature as f64, top_p as f64),
        };
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut weights: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &v)| (i, ((v as f64 - max) / temperature).exp()))
            .collect();
        // Most probable first; equal weights by id, so the order never depends on the sort.
        weights.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f64 = weights.iter().map(|w| w.1).sum();
        let mut kept = 0.0;
        let mut keep = weights.len();
        for (n, &(_, w)) in weights.iter().enumerate() {
            kept += w;
            if kept >= top_p * total {
                keep = n + 1;
                break;
            }
        }
        let nucleus = &weights[..keep];
        let sum: f64 = nucleus.iter().map(|w| w.1).sum();
        let mut target = self.rng.random::<f64>() * sum;
        for &(id, w) in nucleus {
            if target < w {
                return Ok(id as i32);
            }
            target -= w;
        }
        Ok(nucleus[keep - 1].0 as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(sampling: Sampling, logits: &[f32], draws: usize) -> Vec<i32> {
        let mut sampler = Sampler::new(sampling);
        (0..draws).map(|_| sampler.next(logits).unwrap()).collect()
    }

    #[test]
    fn greedy_takes_the_largest_logit() {
        assert_eq!(
            sample(Sampling::Greedy, &[0.1, 3.0, -2.0, 3.0], 3),
            vec![1, 1, 1]
        );
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities ∝ e^2, e^1, e^0, e^-5: 0.665, 0.245, 0.090, 0.0004. top_p 0.8 keeps
        // the first two (0.665 < 0.8 ≤ 0.910); top_p 0.5 keeps the first alone.
        let logits = [2.0, 1.0, 0.0, -5.0];
        let at = |top_p| Sampling::TopP {
            temperature: 1.0,
            top_p,
            seed: 7,
        };
        let draws = sample(at(0.8), &logits, 2000);
        assert!(draws.iter().all(|&t| t == 0 || t == 1), "{draws:?}");
        let ones = draws.iter().filter(|&&t| t == 1).count() as f64 / 2000.0;
        // Renormalised: e^1 / (e^2 + e^1) = 0.269.
        assert!((ones - 0.269).abs() < 0.04, "{ones}");
        assert!(sample(at(0.5), &logits, 200).iter().all(|&t| t == 0));
        // All of it: every token with real weight shows up.
        let all = sample(at(1.0), &logits, 2000);
        for t in 0..3 {
            assert!(all.contains(&t), "token {t} never drawn");
        }
    }

    #[test]
    fn a_seed_replays_and_another_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let with = |seed| Sampling::TopP {
            temperature: 1.0,
            top_p: 0.95,
            seed,
        };
        assert_eq!(sample(with(3), &logits, 64), sample(with(3), &logits, 64));
        assert_ne!(sample(with(3), &logits, 64), sample(with(4), &logits, 64));
    }

    #[test]
    fn low_temperature_approaches_greedy() {
        let logits = [1.0, 1.5, 0.5];
        let cold = Sampling::TopP {
            temperature: 0.01,
            top_p: 1.0,
            seed: 1,
        };
        assert!(sample(cold, &logits, 100).iter().all(|&t| t == 1));
    }

    #[test]
    fn bad_flags_and_logits_are_errors() {
        assert_eq!(Sampling::from_flags(0.0, 1.0, 5).unwrap(), Sampling::Greedy);
        for (t, p, flag) in [
            (-1.0, 1.0, "--temperature"),
            (f32::NAN, 1.0, "--temperature"),
            (1.0, 0.0, "--top-p"),
            (1.0, 1.5, "--top-p"),
            (0.0, 0.9, "--top-p"),
        ] {
            let message = Sampling::from_flags(t, p, 0).unwrap_err().to_string();
            assert!(message.contains(flag), "{message}");
        }
        let mut sampler = Sampler::new(Sampling::from_flags(0.7, 0.9, 0).unwrap());
        assert!(sampler.next(&[0.0, f32::NAN]).is_err());
        assert!(sampler.next(&[]).is_err());
    }
}
