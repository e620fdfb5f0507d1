"""Matching with the template sheets split over several (simulated CPU) devices.

XLA reads ``--xla_force_host_platform_device_count`` only when JAX starts, so each check runs in
a fresh interpreter with ``XLA_FLAGS`` set.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hetmm_jax.distributed import host_devices_env

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import jax
    from jax.sharding import Mesh

    from hetmm_jax import matching

    n_dev = int(sys.argv[1])
    assert jax.device_count() == n_dev, jax.devices()
    rng = np.random.default_rng(0)
    query = rng.normal(size=(2, 6, 5, 8)).astype(np.float32)
    # A sheet count that is not a multiple of the devices exercises the padding.
    templates = rng.normal(size=(n_dev + 3, 6, 5, 8)).astype(np.float32)

    sharded = matching.shard_templates(templates)
    assert sharded.shape[0] % n_dev == 0
    assert len(sharded.sharding.device_set) == n_dev
    # The smooth variant sums over sheets, so it is compared on the padded set; the exact ones
    # are also checked against the unpadded set below.
    cases = [
        lambda t: matching.forward_hetm(query, t, (5, 3)),
        lambda t: matching.backward_hetm(query, t, 3),
        lambda t: matching.hetmm(query, t, 5, (1, 3), 0.8, sheet_chunk=1, rows=2),
        lambda t: matching.smooth_hetmm(query, t, 3, 3, 0.8, temperature=0.05),
        lambda t: matching.anomaly_map([query], [t], [3], [3], 0.8, out_size=(12, 10)),
    ]
    for i, run in enumerate(cases):
        want = np.asarray(run(np.asarray(sharded)))
        got = np.asarray(run(sharded))
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"case {i}")

    for i, run in enumerate(cases[:3]):
        want = np.asarray(run(templates))
        np.testing.assert_allclose(run(sharded), want, atol=1e-5, err_msg=f"unpadded {i}")

    # A 2-D mesh with the sheets on its second axis.
    mesh = Mesh(np.array(jax.devices()).reshape(2, n_dev // 2), ("data", "model"))
    sharded = matching.shard_templates(templates, mesh, axis_name="model")
    want = np.asarray(matching.hetmm(query, templates, 3, 3, 0.5))
    np.testing.assert_allclose(matching.hetmm(query, sharded, 3, 3, 0.5), want, atol=1e-5)

    # Under jit the sharding is not visible, and GSPMD still gives equal results.
    jitted = jax.jit(lambda t: matching.hetmm(query, t, 3, 3, 0.5))
    np.testing.assert_allclose(jitted(matching.shard_templates(templates)), want, atol=1e-5)

    # Gradients through sharded templates equal the single-device ones (exact and smooth; the
    # smooth case on a sheet count with no padding).
    even = rng.normal(size=(2 * n_dev, 6, 5, 8)).astype(np.float32)
    for name, loss in (
        ("exact", lambda q, t: matching.hetmm(q, t, 3, 3, 0.7).sum()),
        ("smooth", lambda q, t: matching.smooth_hetmm(q, t, 3, 3, 0.7, temperature=0.05).sum()),
    ):
        want = np.asarray(jax.grad(loss)(query, even))
        got = np.asarray(jax.grad(loss)(query, matching.shard_templates(even)))
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"grad {name}")
    print("ok", n_dev)
    """
)


@pytest.mark.parametrize("n_dev", [4, 8])
def test_sharded_templates_give_single_device_results(n_dev):
    env = host_devices_env(n_dev, ROOT)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(n_dev)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"ok {n_dev}" in result.stdout
