//! Megatron tensor parallelism for one TP rank's [`Shard`](crate::model::Shard) of a [`Llama`]
//! (docs/design.md §Parallel layout), built from the model's own per-layer pieces.
//!
//! Per layer, with `x` the (replicated) residual stream:
//!
//! ```text
//! xn = RMSNorm₁(x)                      replicated          ── cut F ──
//! a  = o(attn(q,k,v(xn)))               this rank's heads   ── cut G: all-reduce(sum) ──
//! hn = RMSNorm₂(x + a)                  replicated          ── cut F ──
//! m  = down(silu(gate(hn)) · up(hn))    this rank's FFN     ── cut G: all-reduce(sum) ──
//! x' = (x + a) + m  (under the mask)    replicated          ── cut ──
//! ```
//!
//! tch has no custom autograd functions, so every boundary is a *cut*: the value is detached
//! into a fresh leaf that requires grad, and the next segment builds its graph on the leaf.
//! Backward runs the loss's segment first, then every cut's segment in reverse order, seeding
//! it with the gradient its leaf collected (`(out · g).sum().backward()`):
//!
//! * **cut F** (input of a column-parallel group, Megatron's `f`): forward identity; backward
//!   all-reduces the leaf's gradient (each rank's slice of q,k,v / gate,up contributes a partial
//!   gradient of the normed input) before it flows into the norm.
//! * **cut G** (output of a row-parallel projection, Megatron's `g`): forward all-reduces the
//!   partial sums of `o_proj` / `down_proj`; backward is the identity.
//! * plain cuts (the embedding output and every layer's output) exist only so that each
//!   segment's graph is backwarded exactly once, after every consumer of its leaf.
//!
//! Two all-reduces forward and two backward per layer. Because the norms, the embedding and the
//! `lm_head` only ever see replicated values and fully reduced gradients, their gradients come
//! out identical on every TP rank (no reduction needed; the parity test checks it), and so do
//! their AdamW updates.
use crate::model::{Block, Llama};
use crate::parallel::all_reduce_tensor;
use crate::Result;
use tch::{Kind, Tensor};
use trellis_comm::Collective;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Gradient all-reduced in backward (`f`).
    GradSum,
    /// Value all-reduced in forward (`g`).
    ValueSum,
    /// Neither.
    Plain,
}

/// The segments of one forward pass, for the segmented backward.
struct Tape<'c> {
    comm: &'c mut dyn Collective,
    train: bool,
    /// (segment output, the leaf the next segments use, kind), in forward order.
    cuts: Vec<(Tensor, Tensor, Cut)>,
}

impl Tape<'_> {
    /// End a segment at `out`: returns the value later segments build on.
    fn cut(&mut self, out: Tensor, kind: Cut) -> Result<Tensor> {
        let value = match kind {
            Cut::ValueSum => all_reduce_tensor(self.comm, &out)?,
            Cut::GradSum | Cut::Plain => out.detach(),
        };
        if !self.train {
            return Ok(value);
        }
        let leaf = value.set_requires_grad(true);
        self.cuts.push((out, leaf.shallow_clone(), kind));
        Ok(leaf)
    }

    /// Backward of `seed` (the scaled loss), then of every segment in reverse order.
    fn backward(self, seed: &Tensor) -> Result<()> {
        seed.backward();
        for (out, leaf, kind) in self.cuts.into_iter().rev() {
            let g = leaf.grad();
            if !g.defined() || !out.requires_grad() {
                continue;
            }
            let g = match kind {
                Cut::GradSum => all_reduce_tensor(self.comm, &g)?,
                Cut::ValueSum | Cut::Plain => g.detach(),
            };
            (out.to_kind(Kind::Float) * g).sum(Kind::Float).backward();
        }
        Ok(())
    }
}

/// The TP forward: mean next-token cross-entropy of `targets` given `input_ids`, on every rank
/// of the TP group `comm` (each rank holds its shard; all ranks get the same loss).
fn forward(model: &Llama, tape: &mut Tape, input_ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let rope = model.rope();
    let mut x = tape.cut(model.embed(input_ids), Cut::Plain)?;
    for (i, (layer, mask)) in model.layers.iter().zip(&model.masks).enumerate() {
        let mats = model.mats(i);
        let xn = tape.cut(layer.input_layernorm.forward(&x), Cut::GradSum)?;
        let a = layer
            .self_attn
            .forward(&xn, rope, mats)
            .to_kind(Kind::Float);
        let a = tape.cut(a, Cut::ValueSum)?;
        // `x + a` feeds two segments: each builds its own (an add is cheap), so no graph node
        // is shared between segments.
        let hn = tape.cut(
            layer.post_attention_layernorm.forward(&(&x + &a)),
            Cut::GradSum,
        )?;
        let m = layer.mlp.forward(&hn, mats).to_kind(Kind::Float);
        let m = tape.cut(m, Cut::ValueSum)?;
        x = tape.cut(Block::residual_out(&x, &(&x + &a), &m, *mask), Cut::Plain)?;
    }
    Ok(model.loss_from_logits(&model.head(&x), targets))
}

/// One micro-batch's forward and segmented backward on a TP shard: accumulates
/// `scale · ∂loss/∂θ` into this rank's parameter gradients (the full gradient of the
/// replicated parameters, this rank's slice of the split ones). Returns the (unscaled) loss.
/// With `comm` of world size 1 it is the single-device computation, cut into segments.
pub fn forward_backward(
    model: &Llama,
    comm: &mut dyn Collective,
    input_ids: &Tensor,
    targets: &Tensor,
    scale: f64,
) -> Result<f64> {
    let mut tape = Tape {
        comm,
        train: true,
        cuts: Vec::new(),
    };
    let loss = forward(model, &mut tape, input_ids, targets)?;
    let value = loss.double_value(&[]);
    tape.backward(&(&loss * scale))?;
    Ok(value)
}

/// The TP forward without gradients: the mean loss (same on every rank).
pub fn loss(
    model: &Llama,
    comm: &mut dyn Collective,
    input_ids: &Tensor,
    targets: &Tensor,
) -> Result<f64> {
    tch::no_grad(|| {
        let mut tape = Tape {
            comm,
            train: false,
            cuts: Vec::new(),
        };
        Ok(forward(model, &mut tape, input_ids, targets)?.double_value(&[]))
    })
}
