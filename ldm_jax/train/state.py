"""Train state: parameters, optimizer state and an optional EMA of (a subtree of) the params;
and the clu collection a step returns its scalars in."""
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False, default=None)
  ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)
  # The EMA tracks params[ema_key] (e.g. the generator, not the discriminator), or all params.
  ema_key: Optional[str] = flax.struct.field(pytree_node=False, default=None)

  @classmethod
  def create(cls, params, tx, ema_decay: float = 0.0, ema_key: Optional[str] = None):
    state = cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                tx=tx, ema_decay=ema_decay, ema_key=ema_key)
    if ema_decay > 0:
      state = state.replace(ema_params=jax.tree.map(jnp.copy, state.ema_select(params)))
    return state

  def ema_select(self, params):
    return params if self.ema_key is None else params[self.ema_key]

  def apply_gradients(self, grads) -> "TrainState":
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    ema = self.ema_params
    if ema is not None:
      # Warm-up as in LDM's LitEma: early averages must not keep the random initialisation
      # (with 0.999 it would still weigh 13% after 2000 steps).
      decay = jnp.minimum(self.ema_decay, (1.0 + self.step) / (10.0 + self.step))
      ema = optax.incremental_update(self.ema_select(params), ema, 1.0 - decay)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, ema_params=ema)

  def eval_params(self) -> Any:
    """The parameters to evaluate and sample with: the EMA when there is one."""
    return self.ema_params if self.ema_params is not None else self.ema_select(self.params)


def adam_schedule(lr: float, warmup_steps: int, total_steps: int, decay: str = "constant"):
  """Linear warm-up, then constant or cosine decay (optax schedules). A run shorter than its
  warm-up (a short run of a preset) warms up over all but its last step instead of failing."""
  warmup_steps = min(int(warmup_steps), max(int(total_steps) - 1, 1))
  if decay == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 1), max(total_steps, 2))
  if decay == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup_steps, 1)), optax.constant_schedule(lr)],
        [max(warmup_steps, 1)])
  raise ValueError(f"unknown lr decay {decay!r} (optim.decay: 'constant' or 'cosine')")


def cast_tree(tree, dtype: Optional[Any]):
  return tree if dtype is None else jax.tree.map(lambda x: x.astype(dtype), tree)


def all_finite(tree) -> jax.Array:
  """A scalar bool: every floating-point element of `tree` is finite (one fused reduction)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def keep_if_not(ok: jax.Array, new: TrainState, old: TrainState) -> TrainState:
  """`new` where `ok`, else `old`'s parameters, optimizer state and EMA with `new`'s step.

  The step counter still advances, so that the data stream, the per-step rngs and the
  checkpoint step stay aligned with the loop; only the update itself is dropped.
  """
  pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(ok, x, y), a, b)  # noqa: E731
  return new.replace(params=pick(new.params, old.params),
                     opt_state=pick(new.opt_state, old.opt_state),
                     ema_params=pick(new.ema_params, old.ema_params))


def metrics_collection(names):
  """A clu Collection averaging each named scalar over the steps it is merged across."""
  return clu_metrics.Collection.create(
      **{n: clu_metrics.Average.from_output(n) for n in sorted(names)})
