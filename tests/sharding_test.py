"""Member axis sharded over 4 fake CPU devices (in a subprocess: XLA_FLAGS must be set
before jax is imported)."""

import os
import subprocess
import sys
import textwrap

from conftest import REPO

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np, chex
    from ensembling import members, models, optim
    assert jax.device_count() == 4, jax.devices()
    K = 4
    model = models.MLP(widths=(16,), dropout=0.1)
    tx = optim.make_optimizer(learning_rate=0.1)
    v = members.init_members(jax.random.key(0), model, jnp.zeros((1, 6, 6, 1)), K)
    state = members.init_states(v, tx)
    assert members.resolve_strategy("auto", state["params"]) == "vmap"
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(K, 8, 6, 6, 1)).astype(np.float32),
             "y": rng.integers(0, 10, size=(K, 8)).astype(np.int32)}
    keys = members.step_keys(members.member_keys(jax.random.key(1), K), 0)
    step = members.ensemble_step(apply_fn=model.apply, tx=tx, num_members=K, strategy="vmap")
    ref, _ = step(jax.tree.map(jnp.copy, state), batch, keys)
    sharded = members.shard_members(state)
    kernel = sharded["params"]["Dense_0"]["kernel"]
    assert len(kernel.sharding.device_set) == 4, kernel.sharding
    assert kernel.addressable_shards[0].data.shape[0] == 1  # one member per device
    out, _ = step(sharded, members.shard_members(batch), keys)
    assert len(out["params"]["Dense_0"]["kernel"].sharding.device_set) == 4
    chex.assert_trees_all_close(jax.device_get(out), jax.device_get(ref), atol=1e-6)
    try:
        members.shard_members({"x": jnp.zeros((3, 2))})
    except ValueError as e:
        assert "multiple of the device count" in str(e)
    else:
        raise AssertionError("expected a ValueError")
    print("SHARDING_OK")
""")


def test_member_axis_sharded_over_four_devices():
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "SHARDING_OK" in res.stdout
