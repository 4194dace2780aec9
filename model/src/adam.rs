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
        tch::no_grad(|| -> Result<()> {
            for ((p, m), v) in self.params.iter_mut().zip(self.m.iter_mut()).zip(self.v.iter_mut()) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let _ = m.f_mul_scalar_(b1)?.f_add_(&g.f_mul_scalar(1.0 - b1)?)?;
                let _ = v.f_mul_scalar_(b2)?.f_addcmul_(&g.f_mul_scalar(1.0 - b2)?, &g)?;
                let denom = v.f_div_scalar(bias2)?.f_sqrt()?.f_add_scalar(self.eps)?;
                let update = m.f_div(&denom)?.f_mul_scalar(self.lr / bias1)?;
                let _ = p.f_sub_(&update)?;
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
            let loss = n.forward(&xs, true).log_softmax(-1, Kind::Float).nll_loss(&ys);
            loss.backward();
            opt.step().unwrap();
        }
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
        n.forward(xs, true).log_softmax(-1, Kind::Float).nll_loss(ys).backward();
    }
}
