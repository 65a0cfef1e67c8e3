"""The gather fast path against the einsum reference and the fixtures:
same outputs, routing, dropped tokens and training step."""

import functools

import keras
import numpy as np
import pytest
from conftest import FIXTURE_NAMES
from conftest import gradients
from conftest import load_fixture
from conftest import official_logits
from conftest import tiny_backbone_kwargs
from conftest import to_numpy

import keras_e3
from keras_e3.layers.dispatch import make_dispatcher
from keras_e3.layers.dispatch import resolve_dispatcher

MOE_FIXTURES = [n for n in FIXTURE_NAMES if n != "vit_tiny"]


def with_dispatcher(model, dispatcher):
    """A copy of `model` using `dispatcher`, with the same weights."""
    config = dict(model.backbone.get_config(), dispatcher=dispatcher)
    backbone = keras_e3.E3ViTBackbone.from_config(config)
    copy = keras_e3.E3ViT(backbone, num_classes=model.num_classes)
    copy.set_weights(model.get_weights())
    return copy


@pytest.mark.parametrize("name", MOE_FIXTURES)
def test_gather_matches_fixtures_and_einsum(name, monkeypatch):
    """The default gather path gives the official logits and the
    reference's routing; on JAX the fixtures without dropped tokens
    (capacity factor 2, so buckets pay) run their inference on row
    buckets."""
    fx = load_fixture(name)
    reference = keras_e3.E3ViT.from_vmoe(fx["config"], fx["params"])
    fast = with_dispatcher(reference, "gather")
    seen = spy_buckets(monkeypatch)
    logits = official_logits(fast, fx["inputs"])
    if keras.backend.backend() == "jax" and "nodrop" in name:
        assert seen, "no MoE layer ran on row buckets"
    assert np.max(np.abs(logits - fx["logits"])) <= 1e-5
    np.testing.assert_allclose(logits, official_logits(reference,
                                                       fx["inputs"]),
                               atol=2e-6)
    ours = fast.compute_intermediates(fx["inputs"])
    theirs = reference.compute_intermediates(fx["inputs"])
    for block in reference.backbone.moe_blocks:
        key = f"routing/{block.name}"
        np.testing.assert_array_equal(to_numpy(ours[key]["dispatch_mask"]),
                                      to_numpy(theirs[key]["dispatch_mask"]))
        # Later blocks see inputs that differ by fp32 rounding.
        for what in ("combine_weights", "expert_outputs"):
            np.testing.assert_allclose(to_numpy(ours[key][what]),
                                       to_numpy(theirs[key][what]),
                                       atol=2e-6)


def routing_case(rng, groups=3, size=24, experts=8, k=2, valid_from=None):
    logits = rng.normal(size=(groups, size, experts)).astype("float32")
    gates = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    valid = None
    if valid_from is not None:
        valid = np.ones((groups, size), bool)
        valid[-1, valid_from:] = False
        valid = keras.ops.convert_to_tensor(valid)
    return keras.ops.convert_to_tensor(gates), valid


@pytest.mark.parametrize("k,capacity,bpr,padded", [
    (1, 4, False, False), (2, 4, True, False), (2, 8, False, True),
    (2, 12, True, True), (1, 32, False, False)])
def test_gather_dispatch_and_combine_equal_einsum(rng, k, capacity, bpr,
                                                  padded):
    gates, valid = routing_case(rng, k=k, valid_from=10 if padded else None)
    x = rng.normal(size=(3, 24, 5)).astype("float32")
    args = (gates, k, capacity, bpr, valid)
    einsum = make_dispatcher(*args, implementation="einsum")
    gather = make_dispatcher(*args, implementation="gather")
    np.testing.assert_array_equal(to_numpy(gather.dispatch_mask),
                                  to_numpy(einsum.dispatch_mask))
    dispatched = to_numpy(gather.dispatch(x))
    np.testing.assert_array_equal(dispatched, to_numpy(einsum.dispatch(x)))
    assert dispatched.shape == (8, 3 * capacity, 5)
    y = rng.normal(size=dispatched.shape).astype("float32")
    np.testing.assert_allclose(to_numpy(gather.combine(y)),
                               to_numpy(einsum.combine(y)), atol=1e-6)
    if capacity == 4:  # this case drops tokens
        assert to_numpy(einsum.dispatch_mask).sum() < 3 * 24 * k


def test_bfloat16_dispatch_equal(rng):
    gates, _ = routing_case(rng)
    x = rng.normal(size=(3, 24, 5)).astype("float32")
    einsum = make_dispatcher(gates, 2, 8, implementation="einsum",
                             dtype="bfloat16")
    gather = make_dispatcher(gates, 2, 8, implementation="gather",
                             dtype="bfloat16")
    np.testing.assert_array_equal(to_numpy(gather.dispatch(x)),
                                  to_numpy(einsum.dispatch(x)))


@pytest.mark.parametrize("jit", [
    False, pytest.param(True, marks=[pytest.mark.jit, pytest.mark.skipif(
        keras.backend.backend() == "torch", reason="XLA: JAX, TensorFlow")])])
@pytest.mark.parametrize("k,capacity,bpr,padded,dtype", [
    (1, 4, False, False, None), (2, 4, True, False, None),
    (2, 8, False, True, None), (2, 8, True, False, "bfloat16")])
def test_gather_gradients_equal_einsum(rng, jit, k, capacity, bpr, padded,
                                       dtype):
    """Gradients through dispatch, combine (with respect to the expert
    outputs directly) and the gates (the combine weights) agree, dropped
    and padding tokens included."""
    valid = None
    if padded:
        valid = np.ones((3, 24), bool)
        valid[-1, 10:] = False
        valid = keras.ops.convert_to_tensor(valid)
    logits = rng.normal(size=(3, 24, 8)).astype("float32")
    x = rng.normal(size=(3, 24, 5)).astype("float32")
    y = rng.normal(size=(8, 3 * capacity, 5)).astype("float32")
    target = rng.normal(size=(3, 24, 5)).astype("float32")

    def loss(implementation):
        def fn(logits, x, y):
            gates = keras.ops.softmax(logits)
            dispatcher = make_dispatcher(
                gates, k, capacity, bpr, valid, implementation=implementation,
                dtype=dtype)
            expert_outputs = keras.ops.tanh(dispatcher.dispatch(x)) + y
            return keras.ops.sum(keras.ops.multiply(
                dispatcher.combine(expert_outputs), target))

        return fn

    gather = gradients(loss("gather"), (logits, x, y), jit)
    einsum = gradients(loss("einsum"), (logits, x, y), jit)
    for name, a, b in zip(("gates", "x", "expert outputs"), gather, einsum):
        assert np.abs(b).max() > 0.1, name
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("overrides", [
    dict(num_selected_experts=2, ensemble_size=1, capacity_factor=0.5),
    dict(batch_priority=True, capacity_factor=0.5),
    dict(capacity_factor=2.0)])
def test_training_step_equal(rng, overrides):
    """One SGD step (router noise off): every updated weight agrees, so the
    gradients through dispatch, combine and the gates agree."""
    keras.utils.set_random_seed(0)
    backbone = keras_e3.E3ViTBackbone(**tiny_backbone_kwargs(
        router_noise_std=0.0, **overrides))
    reference = keras_e3.E3ViT(backbone, num_classes=3,
                               head_kernel_initializer="glorot_uniform")
    fast = with_dispatcher(reference, "gather")
    x = rng.normal(size=(6, 16, 16, 3)).astype("float32")
    y = np.arange(6) % 3
    for model in (reference, fast):
        model.compile(optimizer=keras.optimizers.SGD(1.0), metrics=None)
        model.train_on_batch(x, y)
    for a, b in zip(reference.weights, fast.weights):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-5,
                                   atol=1e-5, err_msg=a.path)


@pytest.mark.jit
@pytest.mark.skipif(keras.backend.backend() == "torch",
                    reason="XLA compilation: JAX and TensorFlow")
def test_gather_under_jit(rng):
    backbone = keras_e3.E3ViTBackbone(**tiny_backbone_kwargs(
        dispatcher="gather", capacity_factor=0.5))
    model = keras_e3.E3ViT(backbone, num_classes=3,
                           head_kernel_initializer="glorot_uniform")
    x = rng.normal(size=(5, 16, 16, 3)).astype("float32")
    model.compile(jit_compile=True)
    jitted = model.predict(x, verbose=0)
    np.testing.assert_allclose(jitted, to_numpy(model(x)), atol=1e-5)


def test_resolve_dispatcher():
    """"auto" is the gather path on every backend; PyTorch's eager experts
    run each expert on exactly its rows (tiles of one row), the compiled
    loops on 128-row tiles."""
    from keras_e3.layers.dispatch import default_tile_size
    from keras_e3.layers.moe import MoeMlp

    assert resolve_dispatcher("auto") == "gather"
    tile = 1 if keras.backend.backend() == "torch" else 128
    assert default_tile_size() == tile
    assert MoeMlp(4, 16, 20).tile_size == tile
    assert resolve_dispatcher("einsum") == "einsum"
    with pytest.raises(ValueError, match="Unknown dispatcher 'sparse'"):
        resolve_dispatcher("sparse")


# The tiled gather path (TiledDispatcher + ExpertsMlp.call_tiles): kept
# tokens sorted by expert in tiles, the experts run tile by tile.

def use_tiles(model, tile_size):
    """Sets the tile size of every MoE layer of `model` (None: buffers),
    for inference too (no row buckets)."""
    for block in model.backbone.moe_blocks:
        block.mlp.tile_size = tile_size
        block.mlp.row_buckets = False
    return model


TILE_CASES = [  # E, K, M, capacity factor, BPR, group size, tile, images
    (8, 1, 2, 1.5, False, 40, 4, 7),   # E³, padded last group
    (8, 2, 1, 2.0, True, 20, 8, 6),    # V-MoE K=2 with BPR
    (16, 2, 1, 1.0, True, 20, 1, 6),   # drops tokens
    (16, 2, 2, 3.0, True, 40, 8, 5),
    (4, 1, 1, 2.0, False, 16, 1, 3)]


def moe_pair(case, row_buckets=False):
    """(einsum MoeMlp, tiled gather MoeMlp with the same weights, input);
    `row_buckets`: the gather layer's inference runs on row buckets."""
    from keras_e3.layers.moe import MoeMlp

    experts, k, m, cf, bpr, group_size, tile, images = case
    x = np.random.default_rng(1).normal(
        size=(images * m, 10, 8)).astype("float32")
    layers = []
    for path in ("einsum", "gather"):
        keras.utils.set_random_seed(3)
        layer = MoeMlp(experts, 16, group_size, num_selected_experts=k,
                       capacity_factor=cf, batch_priority=bpr,
                       ensemble_size=m, dispatcher=path, noise_std=0.0)
        layer.build(x.shape)
        layer.tile_size = tile
        layer.row_buckets = row_buckets
        layers.append(layer)
    rng = np.random.default_rng(2)
    for a, b in zip(*(layer.weights for layer in layers)):
        value = rng.normal(size=a.shape).astype("float32") * 0.5
        a.assign(value)
        b.assign(value)
    return layers[0], layers[1], x


@pytest.mark.parametrize("case", TILE_CASES)
def test_tiled_moe_equals_einsum(case):
    """Forward (inference and training mode) and input gradients of the
    tiled path equal the einsum reference; the tiles are really used."""
    from keras_e3.layers.dispatch import gather_layout

    einsum, tiled, x = moe_pair(case)
    # (test_gather_layout_names_the_dispatcher_made: the name is the class)
    groups = -(-x.shape[0] * x.shape[1] // case[5])
    assert gather_layout(groups, case[5], case[0], case[1], tiled.capacity,
                         case[6]) == "tiles"
    # The einsum reference is compiled on JAX, whose eager mode compiles
    # each of its many small ops (about 12 s of each case's 32); the tiles
    # run eagerly, as a layer called outside `jit` does.
    jit_reference = keras.backend.backend() == "jax"
    for training in (False, True):
        reference = functools.partial(einsum, training=training)
        if jit_reference:
            import jax

            reference = jax.jit(reference)
        np.testing.assert_allclose(
            to_numpy(tiled(x, training=training)),
            to_numpy(reference(x)), rtol=1e-5, atol=2e-6)
    grads = [gradients(lambda x, layer=layer: keras.ops.sum(keras.ops.sin(
        layer(x, training=True))), (x,), jit=jit)[0]
        for layer, jit in ((einsum, jit_reference), (tiled, False))]
    assert np.abs(grads[0]).max() > 0.1
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-5, atol=2e-6)


def tile_reference(x, params, tile_expert, num_used, tile_size):
    """Row by row: each used tile through its expert, unused tiles zero."""
    kernel_0, bias_0, kernel_1, bias_1 = params
    rows = keras.ops.repeat(tile_expert, tile_size)
    used = keras.ops.cast(
        keras.ops.arange(x.shape[0]) < num_used * tile_size, x.dtype)
    h = keras.ops.einsum("nh,nhf->nf", x, keras.ops.take(kernel_0, rows, 0))
    h = keras.activations.gelu(h + keras.ops.take(bias_0, rows, 0),
                               approximate=True)
    y = keras.ops.einsum("nf,nfh->nh", h, keras.ops.take(kernel_1, rows, 0))
    return (y + keras.ops.take(bias_1, rows, 0)) * used[:, None]


def expert_params(rng, experts):
    """Stacked random expert weights (kernel_0 [E, 6, 10], bias_0 [E, 10],
    kernel_1 [E, 10, 6], bias_1 [E, 6]) at half the normal's scale."""
    return [rng.normal(size=s).astype("float32") * 0.5 for s in
            ((experts, 6, 10), (experts, 10), (experts, 10, 6),
             (experts, 6))]


@pytest.mark.parametrize("jit", [
    False, pytest.param(True, marks=[pytest.mark.jit, pytest.mark.skipif(
        keras.backend.backend() != "jax",
        reason="XLA: JAX (TensorFlow keeps buffers, tiles_supported)")])])
def test_expert_tiles_custom_gradient(rng, jit):
    """The hand-written backward pass of the tile loop gives autodiff's
    gradients of the row-by-row reference (inputs, all four weights),
    with unused tiles skipped."""
    from keras_e3.layers.expert_tiles import expert_tiles

    tile_size, experts = 4, 3
    tile_expert = keras.ops.convert_to_tensor([0, 0, 1, 2, 2, 2, 2],
                                              "int32")
    num_used = 5
    x = rng.normal(size=(7 * tile_size, 6)).astype("float32")
    params = expert_params(rng, experts)
    target = rng.normal(size=x.shape).astype("float32")

    def loss(fn):
        return lambda *args: keras.ops.sum(keras.ops.multiply(fn(
            args[0], args[1:], tile_expert, num_used, tile_size), target))

    def tiled(*args):
        return expert_tiles(*args, differentiable=True)

    ours = gradients(loss(tiled), [x] + params, jit)
    theirs = gradients(loss(tile_reference), [x] + params, False)
    assert np.all(ours[0][num_used * tile_size:] == 0)
    for name, a, b in zip(("x", "kernel_0", "bias_0", "kernel_1", "bias_1"),
                          ours, theirs):
        assert np.abs(b).max() > 0.1, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("k,capacity_factor,experts,tile_size", [
    (1, 1.5, 8, 4), (2, 1.0, 16, 1), (2, 3.0, 8, 4)])
def test_tile_layout(rng, k, capacity_factor, experts, tile_size):
    """Every kept choice gets its own row, inside a tile of its expert,
    among the used tiles, which fit in the static tile count; dropped and
    padding tokens get none."""
    from keras_e3.layers.dispatch import TiledDispatcher
    from keras_e3.layers.dispatch import compute_capacity

    gates, valid = routing_case(rng, groups=4, size=30, experts=experts,
                                k=k, valid_from=7)
    capacity = compute_capacity(30, experts, k, capacity_factor)
    tiled = make_dispatcher(gates, k, capacity, valid=valid,
                            implementation="gather", tile_size=tile_size)
    assert isinstance(tiled, TiledDispatcher)
    einsum = make_dispatcher(gates, k, capacity, valid=valid,
                             implementation="einsum")
    kept = to_numpy(einsum.dispatch_mask)  # [G, S, E, C]
    row = to_numpy(tiled.row)  # [G, S, K]
    num_rows = tiled.num_tiles * tiled.tile_size
    rows = row[row < num_rows]
    assert len(rows) == kept.sum() == len(set(rows.tolist()))
    if capacity_factor == 1.0:  # some choices are dropped
        assert kept.sum() < (3 * 30 + 7) * k
    used = int(to_numpy(tiled.num_used_tiles))
    assert rows.max() < used * tile_size <= num_rows
    tile_expert = to_numpy(tiled.tile_expert)
    expert_index = to_numpy(keras.ops.top_k(gates, k)[1])
    for g, s, c in zip(*np.nonzero(row < num_rows)):
        assert tile_expert[row[g, s, c] // tile_size] == expert_index[g, s, c]


@pytest.mark.parametrize("name", MOE_FIXTURES)
def test_tiled_path_matches_fixtures(name):
    fx = load_fixture(name)
    reference = keras_e3.E3ViT.from_vmoe(fx["config"], fx["params"])
    tiled = use_tiles(with_dispatcher(reference, "gather"), 2)
    logits = official_logits(tiled, fx["inputs"])
    assert np.max(np.abs(logits - fx["logits"])) <= 1e-5


@pytest.mark.jit
@pytest.mark.skipif(keras.backend.backend() != "jax",
                    reason="XLA with tiles: JAX (TensorFlow keeps buffers)")
@pytest.mark.parametrize("layout", ["tiles", "buckets"])
def test_sorted_training_step_under_jit(rng, layout, monkeypatch):
    """One compiled SGD step with tiles, or on row buckets (the default
    there), updates every weight as the einsum reference does."""
    keras.utils.set_random_seed(0)
    backbone = keras_e3.E3ViTBackbone(**tiny_backbone_kwargs(
        router_noise_std=0.0, capacity_factor=1.5, dispatcher="einsum"))
    reference = keras_e3.E3ViT(backbone, num_classes=3,
                               head_kernel_initializer="glorot_uniform")
    tiled = with_dispatcher(reference, "gather")
    if layout == "tiles":
        tiled = use_tiles(tiled, 2)
    seen = spy_buckets(monkeypatch)
    x = rng.normal(size=(6, 16, 16, 3)).astype("float32")
    y = np.arange(6) % 3
    for model in (reference, tiled):
        model.compile(optimizer=keras.optimizers.SGD(1.0), metrics=None,
                      jit_compile=True)
        model.train_on_batch(x, y)
    assert bool(seen) == (layout == "buckets")
    np.testing.assert_allclose(tiled.predict(x, verbose=0),
                               reference.predict(x, verbose=0), atol=1e-5)
    for a, b in zip(reference.weights, tiled.weights):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-5,
                                   atol=1e-5, err_msg=a.path)


# The row buckets of inference (BucketDispatcher + ExpertsMlp.call_buckets):
# each expert's rows in a segment of its own, each expert run on the first
# B_e rows of its segment, B_e the smallest static size that holds its rows.

def spy_buckets(monkeypatch):
    """The buckets of every BucketDispatcher that runs experts from now."""
    from keras_e3.layers.dispatch import BucketDispatcher

    seen = []
    run = BucketDispatcher.run_experts

    def spy(self, *args, **kwargs):
        seen.append(self.buckets)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(BucketDispatcher, "run_experts", spy)
    return seen


@pytest.mark.parametrize("jit", [False, pytest.param(True, marks=[
    pytest.mark.jit])])
@pytest.mark.parametrize("case", TILE_CASES)
def test_bucket_moe_equals_einsum(case, jit, monkeypatch):
    """Inference and training on row buckets (on JAX; the other backends'
    layouts elsewhere) equal the einsum reference, compiled or not: the
    outputs, and in training the input gradients (the weights' through
    a training step: test_sorted_training_step_under_jit)."""
    einsum, bucketed, x = moe_pair(case, row_buckets=True)
    seen = spy_buckets(monkeypatch)
    expected = to_numpy(einsum(x))
    if jit:
        outputs = to_numpy(keras.Sequential([bucketed]).predict_on_batch(x))
    else:
        outputs = to_numpy(bucketed(x, training=False))
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=2e-6)
    assert bool(seen) == (keras.backend.backend() == "jax")
    np.testing.assert_allclose(to_numpy(bucketed(x, training=True)),
                               to_numpy(einsum(x, training=True)),
                               rtol=1e-5, atol=2e-6)
    grads = [gradients(lambda x, layer=layer: keras.ops.sum(keras.ops.sin(
        layer(x, training=True))), (x,), jit=jit)[0]
        for layer in (einsum, bucketed)]
    assert np.abs(grads[0]).max() > 0.1
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-5, atol=2e-6)


def segment_reference(x, params, rows_per_expert, sizes):
    """Every expert on its whole segment, its rows past the smallest size
    that holds its own (worked out here, not by the code under test)
    zeroed."""
    kernel_0, bias_0, kernel_1, bias_1 = params
    computed = [min(s for s in sizes if s >= n) for n in rows_per_expert]
    mask = keras.ops.convert_to_tensor(
        np.arange(x.shape[1])[None, :] < np.array(computed)[:, None],
        "float32")
    h = keras.activations.gelu(keras.ops.einsum(
        "ebh,ehf->ebf", x, kernel_0) + bias_0[:, None], approximate=True)
    y = keras.ops.einsum("ebf,efh->ebh", h, kernel_1) + bias_1[:, None]
    return y * mask[..., None]


@pytest.mark.parametrize("jit", [
    False, pytest.param(True, marks=[pytest.mark.jit, pytest.mark.skipif(
        keras.backend.backend() != "jax",
        reason="XLA: JAX (buckets_supported)")])])
def test_expert_segments_custom_gradient(rng, jit):
    """The hand-written backward pass of the loop over experts gives
    autodiff's gradients of the masked reference (inputs, all four
    weights), an expert with no rows included."""
    from keras_e3.layers.expert_tiles import expert_segments

    experts, bound, sizes = 3, 12, [0, 4, 8, 12]
    rows_per_expert = [5, 0, 12]
    x = rng.normal(size=(experts, bound, 6)).astype("float32")
    params = expert_params(rng, experts)
    target = rng.normal(size=x.shape).astype("float32")
    counts = keras.ops.convert_to_tensor(rows_per_expert, "int32")

    def loss(fn):
        return lambda *args: keras.ops.sum(keras.ops.multiply(
            fn(args[0], args[1:]), target))

    ours = gradients(loss(lambda x, p: expert_segments(
        x, p, counts, sizes, differentiable=True)), [x] + params, jit)
    theirs = gradients(loss(lambda x, p: segment_reference(
        x, p, rows_per_expert, sizes)), [x] + params, False)
    assert np.all(ours[0][0, 8:] == 0) and np.all(ours[0][1] == 0)
    assert np.all(ours[2][1] == 0) and np.all(ours[4][1] == 0)
    for name, a, b in zip(("x", "kernel_0", "bias_0", "kernel_1", "bias_1"),
                          ours, theirs):
        assert np.abs(b).max() > 0.1, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("differentiable", [False, True])
def test_expert_segments_values(rng, differentiable):
    """Both paths (the inference loop, the training step's unrolled
    forward pass) give the masked reference's outputs, experts with no
    rows and a full segment included."""
    from keras_e3.layers.expert_tiles import expert_segments

    experts, bound, sizes = 4, 12, [0, 4, 8, 12]
    rows_per_expert = [5, 0, 12, 3]
    x = rng.normal(size=(experts, bound, 6)).astype("float32")
    params = expert_params(rng, experts)
    counts = keras.ops.convert_to_tensor(rows_per_expert, "int32")
    ours = to_numpy(expert_segments(x, params, counts, sizes,
                                    differentiable=differentiable))
    theirs = to_numpy(segment_reference(x, params, rows_per_expert, sizes))
    assert np.abs(theirs).max() > 0.1
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def _primitive_names(jaxpr):
    """Every primitive in a jaxpr and the jaxprs nested in its equations
    (closed ones included)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for item in value if isinstance(value, (list, tuple)) else [value]:
                item = getattr(item, "jaxpr", item)
                if hasattr(item, "eqns"):
                    names |= _primitive_names(item)
    return names


@pytest.mark.skipif(keras.backend.backend() != "jax",
                    reason="inspects JAX's traced program")
@pytest.mark.parametrize("experts", [3, 8, 9])
def test_expert_segments_loops_unrolled_for_training_only(rng, experts):
    """The training step's loops over up to 8 experts (the forward pass
    that keeps the pre-activations, and the backward pass) are unrolled: no
    loop (`scan` or `while`) in the gradient's program, one `cond` per
    expert and pass. Over 8 experts, and at inference, the loop stays
    (unrolled, 16 experts' training gained nothing, 32 experts' training
    and E³'s inference ran slower)."""
    import jax

    from keras_e3.layers.expert_tiles import expert_segments

    bound, sizes = 12, [0, 4, 8, 12]
    x = rng.normal(size=(experts, bound, 6)).astype("float32")
    params = expert_params(rng, experts)
    counts = keras.ops.convert_to_tensor(
        rng.integers(0, bound + 1, size=experts), "int32")

    def loss(x, *params):
        return jax.numpy.sum(expert_segments(
            x, params, counts, sizes, differentiable=True))

    training = jax.make_jaxpr(jax.grad(loss, argnums=range(5)))(x, *params)
    loops = {"scan", "while"}
    conds = [e for e in training.jaxpr.eqns if e.primitive.name == "cond"]
    if experts <= 8:
        assert not loops & _primitive_names(training.jaxpr)
        assert len(conds) == 2 * experts
    else:
        assert loops & _primitive_names(training.jaxpr)
        assert not conds
    inference = jax.make_jaxpr(lambda x, *p: expert_segments(
        x, p, counts, sizes))(x, *params)
    assert loops & _primitive_names(inference.jaxpr)


@pytest.mark.single_backend
def test_segment_sizes():
    """0, then multiples of a step of about bound / 16 rounded up to 8
    rows, then the bound; worked out by hand."""
    from keras_e3.layers.dispatch import segment_sizes

    assert segment_sizes(608) == [0] + list(range(40, 608, 40)) + [608]
    assert segment_sizes(432) == [0] + list(range(32, 432, 32)) + [432]
    assert segment_sizes(4) == [0, 4]
    assert segment_sizes(8) == [0, 8]
    assert segment_sizes(13) == [0, 8, 13]
    assert segment_sizes(100, branches=4) == [0, 32, 64, 96, 100]


@pytest.mark.parametrize("capacity_factor,tile_size,row_buckets,layout", [
    (1.5, 8, True, "buckets"), (1.5, 8, False, "tiles"),
    (1.5, None, False, "buffers"), (1.0, None, True, "buckets")])
def test_gather_layout_names_the_dispatcher_made(capacity_factor, tile_size,
                                                 row_buckets, layout):
    """`gather_layout` (the benchmarks' report) names the dispatcher that
    `make_dispatcher` builds for the same shapes."""
    from keras_e3.layers import dispatch

    classes = dict(buckets=dispatch.BucketDispatcher,
                   tiles=dispatch.TiledDispatcher,
                   buffers=dispatch.GatherDispatcher)
    capacity = dispatch.compute_capacity(400, 8, 1, capacity_factor)
    gates = keras.ops.softmax(keras.ops.convert_to_tensor(
        np.random.default_rng(0).normal(size=(4, 400, 8)), "float32"))
    assert dispatch.gather_layout(4, 400, 8, 1, capacity, tile_size,
                                  row_buckets) == layout
    made = make_dispatcher(gates, 1, capacity, implementation="gather",
                           tile_size=tile_size, row_buckets=row_buckets)
    assert type(made) is classes[layout]


@pytest.mark.parametrize("k,capacity_factor,experts", [
    (1, 1.5, 8), (2, 1.2, 16), (2, 3.0, 8)])
def test_bucket_layout(rng, k, capacity_factor, experts):
    """Every kept choice gets its own row in its expert's segment, among
    the first `rows_per_expert` rows there; dropped and padding tokens get
    none."""
    from keras_e3.layers.dispatch import BucketDispatcher
    from keras_e3.layers.dispatch import compute_capacity

    gates, valid = routing_case(rng, groups=4, size=30, experts=experts,
                                k=k, valid_from=7)
    capacity = compute_capacity(30, experts, k, capacity_factor,
                                multiple_of=None)
    bucketed = make_dispatcher(gates, k, capacity, valid=valid,
                               implementation="gather", row_buckets=True)
    assert isinstance(bucketed, BucketDispatcher)
    bound = bucketed.rows_bound
    assert bound == 4 * min(capacity, 30)
    kept = to_numpy(make_dispatcher(gates, k, capacity, valid=valid,
                                    implementation="einsum").dispatch_mask)
    row = to_numpy(bucketed.row)
    rows = row[row < experts * bound]
    assert len(rows) == kept.sum() == len(set(rows.tolist()))
    if capacity_factor == 1.2:  # some choices are dropped
        assert kept.sum() < (3 * 30 + 7) * k
    counts = to_numpy(bucketed.rows_per_expert)
    np.testing.assert_array_equal(counts, kept.sum(axis=(0, 1, 3)))
    expert_index = to_numpy(keras.ops.top_k(gates, k)[1])
    for g, s, c in zip(*np.nonzero(row < experts * bound)):
        e = expert_index[g, s, c]
        assert e * bound <= row[g, s, c] < e * bound + counts[e]


@pytest.mark.parametrize("rows,computed", [
    ([9, 0, 17], [16, 0, 24]), ([16, 3, 24], [16, 8, 24]),
    ([1, 8, 23], [8, 8, 24]), ([0, 0, 0], [0, 0, 0])])
def test_call_buckets_runs_each_expert_on_its_smallest_bucket(rng, rows,
                                                              computed):
    """Expert e's first `computed[e]` rows (the smallest size that holds
    its `rows[e]`) go through its MLP, the rest of its segment is zeros."""
    from keras_e3.layers.mlp import ExpertsMlp

    experts = ExpertsMlp(3, 10)
    x = rng.normal(size=(3, 24, 6)).astype("float32")
    experts.build(x.shape)
    out = to_numpy(experts.call_buckets(
        keras.ops.reshape(x, (-1, 6)),
        keras.ops.convert_to_tensor(rows, "int32"), [0, 8, 16, 24]))
    out = out.reshape(3, 24, 6)
    expected = to_numpy(experts(x))
    assert np.all(np.abs(expected) > 0)
    for e, n in enumerate(computed):
        np.testing.assert_allclose(out[e, :n], expected[e, :n], rtol=1e-5,
                                   atol=1e-6)
        assert np.all(out[e, n:] == 0)


@pytest.mark.parametrize("depth", [1, 2])
def test_portable_scatter_adds_repeated_indices(rng, depth):
    """`portable_ops.scatter` (one index_put_ on PyTorch) equals
    ops.scatter: zeros with the values added, repeated indices summed."""
    from keras_e3.layers.portable_ops import scatter

    shape = (3, 5, 2)[:depth] + (2,)
    indices = rng.integers(0, 3, (40, depth)).astype("int32")
    values = rng.integers(1, 9, (40, 2)).astype("int32")
    expected = np.zeros(shape, "int32")
    np.add.at(expected, tuple(indices.T), values)
    assert len({tuple(i) for i in indices}) < len(indices)  # repeats
    out = scatter(indices, values, shape)
    assert keras.backend.standardize_dtype(out.dtype) == "int32"
    np.testing.assert_array_equal(to_numpy(out), expected)
