//! The inner optimiser: Adam over a network's trainable tensors, written out
//! here (rather than libtorch's) so that its state can be checkpointed and
//! restored after a crash.

use tch::Tensor;

use crate::net::Network;
use crate::{ModelError, Result};

/// Adam's moments and step count, flattened in layout order.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamState {
    pub step: u64,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

pub struct Adam {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    step: u64,
    params: Vec<Tensor>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl Adam {
    /// Adam with PyTorch's defaults (β = 0.9, 0.999; ε = 1e-8).
    pub fn new(net: &Network, lr: f64) -> Self {
        let params = net.trainable();
        let zeros = |p: &Tensor| p.zeros_like().detach();
        Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 0,
            m: params.iter().map(zeros).collect(),
            v: params.iter().map(zeros).collect(),
            params,
        }
    }

    pub fn zero_grad(&mut self) {
        for p in self.params.iter_mut() {
            p.zero_grad();
        }
    }

    /// One update from the gradients left by `backward`.
    pub fn step(&mut self) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let bias1 = 1.0 - b1.powi(t);
        let bias2 = 1.0 - b2.powi(t);
        // p -= lr/bias1 * m / (sqrt(v/bias2) + eps), rearranged as PyTorch
        // does (step = lr * sqrt(bias2) / bias1, eps scaled by sqrt(bias2))
        // so that a step is seven kernels and two temporaries per tensor:
        // on a small model the optimiser's elementwise passes, not the
        // matrix products, were most of a local step.
        let root2 = bias2.sqrt();
        let step = self.lr * root2 / bias1;
        tch::no_grad(|| -> Result<()> {
            for ((p, m), v) in self.params.iter_mut().zip(self.m.iter_mut()).zip(self.v.iter_mut()) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                // m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g².
                let _ = m.f_lerp_(&g, 1.0 - b1)?;
                let _ = v.f_lerp_(&g.f_square()?, 1.0 - b2)?;
                // denom = -(sqrt(v) + eps sqrt(bias2)) / step, so that
                // p += m / denom is the step.
                let mut denom = v.f_sqrt()?;
                let _ = denom.f_add_scalar_(self.eps * root2)?.f_mul_scalar_(-1.0 / step)?;
                let _ = p.f_addcdiv_(m, &denom)?;
            }
            Ok(())
        })
    }

    pub fn state(&self) -> Result<AdamState> {
        let flat = |ts: &[Tensor]| -> Result<Vec<f32>> {
            let mut out = Vec::new();
            for t in ts {
                out.extend(Vec::<f32>::try_from(&t.detach().flatten(0, -1))?);
            }
            Ok(out)
        };
        Ok(AdamState {
            step: self.step,
            m: flat(&self.m)?,
            v: flat(&self.v)?,
        })
    }

    pub fn set_state(&mut self, state: &AdamState) -> Result<()> {
        let total: usize = self.params.iter().map(|p| p.numel()).sum();
        if state.m.len() != total || state.v.len() != total {
            return Err(ModelError::ParamCount {
                expected: total,
                got: state.m.len().min(state.v.len()),
            });
        }
        let mut off = 0;
        tch::no_grad(|| -> Result<()> {
            for ((p, m), v) in self.params.iter().zip(self.m.iter_mut()).zip(self.v.iter_mut()) {
                let n = p.numel();
                let shape = p.size();
                m.f_copy_(&Tensor::from_slice(&state.m[off..off + n]).f_reshape(&shape)?)?;
                v.f_copy_(&Tensor::from_slice(&state.v[off..off + n]).f_reshape(&shape)?)?;
                off += n;
            }
            Ok(())
        })?;
        self.step = state.step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Arch;
    use crate::Schema;
    use tch::{Device, Kind};

    fn net() -> Network {
        let shape = Schema::Image {
            channels: 1,
            height: 4,
            width: 4,
            classes: 3,
        };
        let mut n = Network::new(Arch::Mlp, &shape, Device::Cpu).unwrap();
        let g = n.layout().genesis(1);
        n.load_flat(&g).unwrap();
        n
    }

    fn train(n: &Network, opt: &mut Adam, steps: usize) {
        let xs = Tensor::ones([8, 1, 4, 4], (Kind::Float, Device::Cpu));
        let ys = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2, 0, 1]);
        for _ in 0..steps {
            opt.zero_grad();
            let loss = n.forward(&xs, true).unwrap().log_softmax(-1, Kind::Float).nll_loss(&ys);
            loss.backward();
            opt.step().unwrap();
        }
    }

    #[test]
    fn steps_as_the_textbook_adam_does() {
        let a = net();
        let mut oa = Adam::new(&a, 1e-2);
        let b = net();
        let mut params = b.trainable();
        let mut m: Vec<Vec<f64>> = params.iter().map(|p| vec![0.0; p.numel()]).collect();
        let mut v = m.clone();
        let xs = Tensor::ones([8, 1, 4, 4], (Kind::Float, Device::Cpu));
        let ys = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2, 0, 1]);
        let (lr, b1, b2, eps) = (1e-2, 0.9f64, 0.999f64, 1e-8);
        for t in 1..=5 {
            train(&a, &mut oa, 1);
            for p in params.iter_mut() {
                p.zero_grad();
            }
            b.forward(&xs, true)
                .unwrap()
                .log_softmax(-1, Kind::Float)
                .nll_loss(&ys)
                .backward();
            for (i, p) in params.iter_mut().enumerate() {
                let g = Vec::<f32>::try_from(&p.grad().flatten(0, -1)).unwrap();
                let mut w = Vec::<f32>::try_from(&p.detach().flatten(0, -1)).unwrap();
                for j in 0..w.len() {
                    let g = f64::from(g[j]);
                    m[i][j] = b1 * m[i][j] + (1.0 - b1) * g;
                    v[i][j] = b2 * v[i][j] + (1.0 - b2) * g * g;
                    let m_hat = m[i][j] / (1.0 - b1.powi(t));
                    let v_hat = v[i][j] / (1.0 - b2.powi(t));
                    w[j] = (f64::from(w[j]) - lr * m_hat / (v_hat.sqrt() + eps)) as f32;
                }
                let shape = p.size();
                tch::no_grad(|| p.copy_(&Tensor::from_slice(&w).reshape(&shape)));
            }
        }
        let (wa, wb) = (a.flat().unwrap(), b.flat().unwrap());
        let worst = wa.iter().zip(&wb).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "largest difference from the textbook Adam: {worst}");
    }

    #[test]
    fn state_round_trip_resumes_identically() {
        let a = net();
        let mut oa = Adam::new(&a, 1e-2);
        train(&a, &mut oa, 3);
        let saved = oa.state().unwrap();
        let weights = a.flat().unwrap();

        let mut b = net();
        b.load_flat(&weights).unwrap();
        let mut ob = Adam::new(&b, 1e-2);
        ob.set_state(&saved).unwrap();
        train(&a, &mut oa, 2);
        train(&b, &mut ob, 2);
        assert_eq!(a.flat().unwrap(), b.flat().unwrap());
        assert_eq!(ob.state().unwrap().step, 5);
        assert!(ob
            .set_state(&AdamState {
                step: 1,
                m: vec![0.0],
                v: vec![0.0]
            })
            .is_err());
    }

    #[test]
    fn loss_goes_down() {
        let a = net();
        let mut o = Adam::new(&a, 1e-2);
        let xs = Tensor::ones([8, 1, 4, 4], (Kind::Float, Device::Cpu));
        let ys = Tensor::from_slice(&[1i64; 8]);
        let loss = |n: &Network| {
            n.forward(&xs, false)
                .unwrap()
                .log_softmax(-1, Kind::Float)
                .nll_loss(&ys)
                .double_value(&[])
        };
        let before = loss(&a);
        for _ in 0..20 {
            o.zero_grad();
            n_backward(&a, &xs, &ys);
            o.step().unwrap();
        }
        assert!(loss(&a) < before * 0.5, "{} -> {}", before, loss(&a));
    }

    fn n_backward(n: &Network, xs: &Tensor, ys: &Tensor) {
        n.forward(xs, true)
            .unwrap()
            .log_softmax(-1, Kind::Float)
            .nll_loss(ys)
            .backward();
    }
}
