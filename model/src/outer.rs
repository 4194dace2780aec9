//! The outer optimiser: how an aggregate moves the anchor weights.
//!
//! As in DiLoCo, the aggregate of the deltas acts as a pseudo-gradient
//! (pointing downhill), stepped with an outer learning rate and optionally
//! Nesterov momentum. Plain f32 arithmetic in a fixed order, so a replay from
//! the ledger reproduces the anchor bit for bit.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OuterConfig {
    pub lr: f32,
    /// 0 for plain averaging steps.
    pub momentum: f32,
    pub nesterov: bool,
}

impl Default for OuterConfig {
    fn default() -> Self {
        Self {
            lr: 1.0,
            momentum: 0.0,
            nesterov: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct OuterOptimizer {
    cfg: OuterConfig,
    velocity: Vec<f32>,
    /// Buffers (batch-norm statistics) step plainly: `anchor += update`.
    /// Momentum would overshoot them, and a running variance must stay
    /// positive.
    plain: Vec<std::ops::Range<usize>>,
}

impl OuterOptimizer {
    pub fn new(cfg: OuterConfig, params: usize, plain: Vec<std::ops::Range<usize>>) -> Self {
        Self {
            cfg,
            velocity: if cfg.momentum > 0.0 {
                vec![0.0; params]
            } else {
                Vec::new()
            },
            plain,
        }
    }

    pub fn velocity(&self) -> &[f32] {
        &self.velocity
    }

    /// Restores checkpointed momentum (ignored when momentum is off).
    pub fn set_velocity(&mut self, velocity: Vec<f32>) -> bool {
        if self.cfg.momentum > 0.0 && velocity.len() == self.velocity.len() {
            self.velocity = velocity;
            true
        } else {
            false
        }
    }

    /// anchor += lr · u (plain), or with momentum v = μv + u:
    /// anchor += lr · (u + μv) (Nesterov) or lr · v (heavy ball).
    pub fn step(&mut self, anchor: &mut [f32], update: &[f32]) {
        let n = anchor.len().min(update.len());
        let mut from = 0;
        for r in self.plain.clone() {
            let (s, e) = (r.start.min(n), r.end.min(n));
            self.momentum_step(anchor, update, from..s.max(from));
            for i in s..e {
                anchor[i] += update[i];
            }
            from = e.max(from);
        }
        self.momentum_step(anchor, update, from..n);
    }

    fn momentum_step(&mut self, anchor: &mut [f32], update: &[f32], range: std::ops::Range<usize>) {
        let OuterConfig { lr, momentum, nesterov } = self.cfg;
        if momentum <= 0.0 {
            for i in range {
                anchor[i] += lr * update[i];
            }
            return;
        }
        for i in range {
            let u = update[i];
            let v = &mut self.velocity[i];
            *v = momentum * *v + u;
            let step = if nesterov { u + momentum * *v } else { *v };
            anchor[i] += lr * step;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_step_adds_the_update() {
        let mut o = OuterOptimizer::new(OuterConfig::default(), 2, Vec::new());
        let mut a = vec![1.0, 2.0];
        o.step(&mut a, &[0.5, -1.0]);
        assert_eq!(a, vec![1.5, 1.0]);
    }

    #[test]
    fn nesterov_known_answer() {
        let cfg = OuterConfig {
            lr: 0.5,
            momentum: 0.9,
            nesterov: true,
        };
        let mut o = OuterOptimizer::new(cfg, 1, Vec::new());
        let mut a = vec![0.0];
        o.step(&mut a, &[1.0]); // v = 1, step = 1 + 0.9 = 1.9
        assert!((a[0] - 0.95).abs() < 1e-6);
        o.step(&mut a, &[1.0]); // v = 1.9, step = 1 + 1.71 = 2.71
        assert!((a[0] - (0.95 + 1.355)).abs() < 1e-6);
    }

    #[test]
    fn buffers_step_plainly() {
        let cfg = OuterConfig {
            lr: 0.5,
            momentum: 0.9,
            nesterov: true,
        };
        let buffers: Vec<std::ops::Range<usize>> = std::iter::once(1..3).collect();
        let mut o = OuterOptimizer::new(cfg, 4, buffers);
        let mut a = vec![0.0; 4];
        o.step(&mut a, &[1.0, 1.0, -2.0, 1.0]);
        assert_eq!(a, vec![0.95, 1.0, -2.0, 0.95]);
    }
}
