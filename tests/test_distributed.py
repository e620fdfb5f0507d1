"""Scale-out over a 2-D ("queries", "sheets") mesh of forced host-platform CPU devices.

XLA reads ``--xla_force_host_platform_device_count`` only when JAX starts, so each device count
runs in a fresh interpreter; both interpreters start together (they share the CPU cores) and
each test reads its own one's report. The reference is the single-device computation in the
same interpreter: :func:`hetmm_jax.matching.anomaly_map` on plain arrays and
:meth:`hetmm_jax.Detector.predict`.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hetmm_jax.distributed import host_devices_env

ROOT = Path(__file__).resolve().parents[1]
COUNTS = (4, 8)

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, "tests")
    from conftest import textured
    from hetmm_jax import Detector, matching
    from hetmm_jax import distributed as dist

    n_dev = int(sys.argv[1])
    assert jax.device_count() == n_dev, jax.devices()
    rng = np.random.default_rng(n_dev)
    shapes = [(6, 5, 8), (3, 3, 4)]
    # Batch and sheet counts that are no multiple of the mesh axes exercise the padding.
    queries = [rng.normal(size=(3, *s)).astype(np.float32) for s in shapes]
    templates = [rng.normal(size=(n_dev + 3, *s)).astype(np.float32) for s in shapes]
    even = [t[:n_dev] for t in templates]
    args = dict(forward_patches=[(5, 3), 3], backward_patches=[3, (1, 3)], alphas=[1.0, 0.3],
                layer_weights=[1.0, 0.5], out_size=(12, 10))

    def single(t, **kw):
        return np.asarray(matching.anomaly_map(queries, t, **args, **kw))

    # (2, n / 2) splits both axes; (1, n) only the sheets. Layer 1 has alpha 1 (no backward
    # pass); the blurred maps come from the same call.
    for shape in [(2, n_dev // 2), (1, n_dev)]:
        mesh = dist.make_mesh(*shape)
        placed = dist.shard_template_set(templates, mesh)
        assert len(placed[0].sharding.device_set) == n_dev
        got, blurred = dist.sharded_anomaly_map(queries, placed, mesh=mesh, sigma=1.5, **args)
        assert got.shape == (3, 12, 10)
        want = single(templates)
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=str(shape))
        np.testing.assert_allclose(blurred, matching.gaussian_blur(want, 1.5), atol=2e-5)

    # The smooth variant on a sheet count the axis divides (no padding).
    got = dist.sharded_anomaly_map(queries, even, mesh=dist.make_mesh(2, n_dev // 2),
                                   temperature=0.05, **args)
    np.testing.assert_allclose(got, single(even, temperature=0.05), atol=2e-5)

    # Gradients with respect to the queries, through the cross-device reductions (one layer
    # with both directions; on 4 devices only, to keep the run short).
    if n_dev == 4:
        mesh = dist.make_mesh(2, 2)
        layer = dict(forward_patches=[3], backward_patches=[(1, 3)], alphas=[0.3],
                     out_size=(5, 5))
        placed = dist.shard_template_set(even[1:], mesh)
        for temperature in (None, 0.05):
            def loss(q, fn, t):
                return jnp.sum(jnp.sin(fn([q], t)))
            want = jax.grad(loss)(queries[1], lambda q, t: matching.anomaly_map(
                q, t, temperature=temperature, **layer), even[1:])
            got = jax.grad(loss)(queries[1], lambda q, t: dist.sharded_anomaly_map(
                q, t, mesh=mesh, temperature=temperature, **layer), placed)
            assert np.any(np.asarray(want) != 0)
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"grad {temperature}")

    # Detector level: the backbone and the matching over the mesh.
    train = [textured(rng, 64) for _ in range(n_dev + 1)]
    tests = [textured(rng, 64, defect=i % 2 == 1) for i in range(5)]
    detector = Detector("efficientnet_lite0", image_size=64, layers=("layer1", "layer2"),
                        forward_patches=(3, 3), backward_patches=(1, 3), sigma=1.0,
                        batch_size=4).fit(train)
    detector.threshold_ = float(np.median(detector.predict(tests).scores))
    want = detector.predict(tests, model_maps=True)
    got = dist.predict_sharded(detector, tests, mesh=dist.make_mesh(2, n_dev // 2))
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.model_maps, want.model_maps, rtol=1e-4, atol=1e-5)
    assert np.array_equal(got.labels, want.labels)
    assert all(np.array_equal(a, b) for a, b in zip(got.masks, want.masks))
    print("ok", n_dev)
    """
)


@pytest.fixture(scope="module")
def reports():
    """Starts one interpreter per device count at once; yields count -> (rc, stdout, stderr)."""
    procs = {}
    for n_dev in COUNTS:
        env = host_devices_env(n_dev, ROOT)
        procs[n_dev] = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(n_dev)], env=env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    out = {}
    try:
        for n_dev, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=400)
            out[n_dev] = (proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return out


@pytest.mark.parametrize("n_dev", COUNTS)
def test_mesh_results_equal_single_device(reports, n_dev):
    rc, stdout, stderr = reports[n_dev]
    assert rc == 0, stderr[-4000:]
    assert f"ok {n_dev}" in stdout


def test_make_mesh_checks_its_sizes():
    import jax

    from hetmm_jax import distributed as dist
    from hetmm_jax.errors import InputError

    mesh = dist.make_mesh()
    assert mesh.axis_names == dist.AXES and mesh.devices.size == jax.device_count()
    with pytest.raises(InputError, match="product"):
        dist.make_mesh(queries=jax.device_count() + 1, sheets=1)
    with pytest.raises(InputError, match="axes"):
        dist.sharded_anomaly_map([], [], 3, 3, 0.5, out_size=(4, 4),
                                 mesh=jax.sharding.Mesh(jax.devices(), ("x",)))
