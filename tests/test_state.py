"""TrainState: optimizer update and the EMA with LDM's warm-up."""
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax.train.state import TrainState


def test_ema_follows_ldm_warmup_formula():
  state = TrainState.create({"w": jnp.zeros(())}, optax.sgd(1.0), ema_decay=0.999)
  ema, w = 0.0, 0.0
  for step in range(5):
    state = state.apply_gradients({"w": jnp.float32(-1.0)})  # w += 1 each step
    w += 1.0
    decay = min(0.999, (1 + step) / (10 + step))
    ema = decay * ema + (1 - decay) * w
    np.testing.assert_allclose(state.ema_params["w"], ema, rtol=1e-6)
  assert int(state.step) == 5 and float(state.params["w"]) == 5.0
  assert state.eval_params() is state.ema_params


def test_ema_tracks_only_the_selected_subtree():
  params = {"gen": {"w": jnp.ones(2)}, "disc": {"w": jnp.ones(3)}}
  state = TrainState.create(params, optax.sgd(0.1), ema_decay=0.5, ema_key="gen")
  assert set(state.ema_params) == {"w"} and state.ema_params["w"].shape == (2,)
  no_ema = TrainState.create(params, optax.sgd(0.1))
  assert no_ema.ema_params is None and no_ema.eval_params() is params


def test_schedule_of_a_run_shorter_than_its_warmup():
  from ldm_jax.train.state import adam_schedule
  for decay in ("cosine", "constant"):
    lr = adam_schedule(1e-3, 100, 20, decay)  # num_steps <= warmup_steps
    values = np.array([float(lr(s)) for s in range(21)])
    assert np.all(np.isfinite(values)) and values[0] == 0.0
    assert values.max() == np.float32(1e-3) and np.argmax(values) == 19
