"""The router contract and the dispatch policy (issue 31): every router's
`route` returns a `Dispatcher` (one abstract interface) and its metrics;
`dispatch_plan` alone decides the layout, from a table of cases whose
expected layouts are worked out by hand below (rows stored by each layout:
buffers E*G*C, tiles whole tiles of 128 rows per expert; buckets, for
inference on JAX wherever G is static, each expert's rows rounded up to a
step of about G*min(C, S) / 16, at most the buffers' rows)."""

import inspect

import numpy as np
import pytest

from keras_e3.layers import MoeMlp
from keras_e3.layers import dispatch
from keras_e3.layers import experts_choice
from keras_e3.layers import soft_moe
from keras_e3.layers.dispatch import Dispatcher
from keras_e3.layers.dispatch import DispatchOptions
from keras_e3.layers.dispatch import dispatch_plan

# (G, S, E, K, C) shapes:
# SMALL: C = 52 (factor 1.0, rounded up to a multiple of 4). Buffers
#   8*4*52 = 1664 rows; tiles (1600 + 8*127) // 128 = 20 tiles = 2560
#   rows > 1664: no.
SMALL = (4, 400, 8, 1, 52)
# ROOMY: C = 76 (factor 1.5). Buffers 2432; tiles (1600 + 1016) // 128
#   = 20 -> 2560 > 2432: tiles do not pay.
ROOMY = (4, 400, 8, 1, 76)
# LARGE: C = 600 (factor 1.5, S = 3200). Buffers 8*4*600 = 19200; tiles
#   (12800 + 1016) // 128 = 107 -> 13696 < 19200: tiles pay.
LARGE = (4, 3200, 8, 1, 600)

CASES = [
    # router, implementation, shapes, backend, options -> layout
    ("soft", "auto", SMALL, "jax", {}, "soft"),
    ("soft", "einsum", LARGE, "tensorflow", {"training": True}, "soft"),
    ("experts_choice", "auto", LARGE, "jax", {}, "buffers"),
    ("experts_choice", "gather", LARGE, "torch", {}, "buffers"),
    ("experts_choice", "auto", LARGE, "jax", {"distributed": True},
     "einsum"),
    ("experts_choice", "einsum", LARGE, "jax", {}, "einsum"),
    ("top_k", "einsum", LARGE, "jax", {}, "einsum"),
    ("top_k", "auto", SMALL, "jax", {}, "buckets"),
    ("top_k", "auto", SMALL, "jax", {"row_buckets": False}, "buffers"),
    ("top_k", "auto", ROOMY, "jax", {}, "buckets"),
    ("top_k", "auto", ROOMY, "jax", {"row_buckets": False}, "buffers"),
    ("top_k", "auto", ROOMY, "jax", {"training": True}, "buckets"),
    ("top_k", "auto", ROOMY, "jax", {"training": True,
                                     "row_buckets": False}, "buffers"),
    ("top_k", "auto", LARGE, "jax", {}, "buckets"),
    ("top_k", "auto", LARGE, "jax", {"row_buckets": False}, "tiles"),
    ("top_k", "auto", LARGE, "jax", {"training": True}, "buckets"),
    ("top_k", "auto", LARGE, "jax", {"training": True,
                                     "row_buckets": False}, "tiles"),
    ("top_k", "auto", LARGE, "jax",
     {"training": True, "expert_dropout": True}, "buffers"),
    ("top_k", "auto", LARGE, "jax", {"expert_dropout": True}, "buckets"),
    ("top_k", "auto", LARGE, "jax", {"inspect": True}, "buffers"),
    ("top_k", "auto", LARGE, "jax", {"distributed": True}, "buffers"),
    ("top_k", "auto", LARGE, "jax", {"tile_size": None,
                                     "row_buckets": False}, "buffers"),
    ("top_k", "auto", LARGE, "tensorflow", {}, "buffers"),
    ("top_k", "auto", LARGE, "tensorflow", {"training": True}, "buffers"),
    ("top_k", "auto", LARGE, "torch", {"tile_size": 1}, "tiles"),
    ("top_k", "auto", LARGE, "torch", {"tile_size": 1, "training": True},
     "buffers"),
    ("top_k", "gather", (None, *LARGE[1:]), "jax", {}, "buffers"),
]


@pytest.mark.single_backend
@pytest.mark.parametrize("router,implementation,shapes,backend,options,"
                         "layout", CASES)
def test_dispatch_plan_table(router, implementation, shapes, backend,
                             options, layout):
    plan = dispatch_plan(router, implementation, *shapes, backend=backend,
                         **options)
    assert plan.layout == layout


@pytest.mark.single_backend
def test_plan_allows_tiles_and_buckets_only_where_the_conditions_hold():
    plan = dispatch_plan("top_k", "auto", None, 400, 8, 1, 52,
                         backend="jax")
    assert (plan.tile_size, plan.row_buckets) == (dispatch.TILE_SIZE, True)
    plan = dispatch_plan("top_k", "auto", None, 400, 8, 1, 52,
                         training=True, expert_dropout=True, backend="jax")
    assert (plan.tile_size, plan.row_buckets) == (None, False)
    plan = dispatch_plan("top_k", "auto", None, 400, 8, 1, 52,
                         backend="tensorflow")
    assert (plan.tile_size, plan.row_buckets) == (None, False)


@pytest.mark.single_backend
def test_dispatcher_is_abstract():
    with pytest.raises(TypeError):
        Dispatcher()
    with pytest.raises(TypeError):
        dispatch.SortedDispatcher(None, None, None, 1)
    classes = [dispatch.EinsumDispatcher, dispatch.GatherDispatcher,
               dispatch.TiledDispatcher, dispatch.BucketDispatcher,
               experts_choice.ExpertsChoiceGatherDispatcher,
               soft_moe.SoftDispatcher]
    for cls in classes:
        assert issubclass(cls, Dispatcher)
        assert cls.layout in dispatch.LAYOUTS
        assert not inspect.isabstract(cls), cls


@pytest.mark.single_backend
def test_moe_call_has_no_router_branch():
    source = inspect.getsource(MoeMlp.call)
    for word in ("router_type", "top_k", "experts_choice", "soft",
                 "isinstance"):
        assert word not in source


@pytest.mark.parametrize("router,settings,layout", [
    ("top_k", {"num_selected_experts": 2}, "buffers"),
    ("top_k", {"num_selected_experts": 2, "dispatcher": "einsum"}, "einsum"),
    ("experts_choice", {}, "buffers"),
    ("experts_choice", {"dispatcher": "einsum"}, "einsum"),
    ("soft", {"num_slots": 2}, "soft"),
])
def test_every_router_returns_a_dispatcher_and_metrics(router, settings,
                                                       layout):
    """The contract on each router, with the buffers' [E, G*C, H] layout
    computed here: 4 experts, groups of 8 tokens, C = 4 (top-K with K = 2
    and factor 1: 8*2/4 = 4), 4 (Experts Choice: 8/4 = 2, rounded up to 4)
    or P = 2 (Soft MoE)."""
    layer = MoeMlp(4, 8, 8, router=router, noise_std=0.0, **settings)
    x = np.random.default_rng(0).normal(size=(2, 8, 6)).astype("float32")
    layer.build(x.shape)
    plan = layer.dispatch_plan(2, training=False, return_routing=True)
    assert plan.layout == layout
    dispatcher, metrics = layer.router.route(
        x, options=DispatchOptions(capacity=layer.capacity,
                                   layout=plan.layout, inspect=True))
    assert isinstance(dispatcher, Dispatcher)
    assert dispatcher.layout == layout
    assert "auxiliary_loss" in metrics
    slots = {"soft": 2}.get(router, 4)
    assert tuple(dispatcher.dispatch(x).shape) == (4, 2 * slots, 6)
    routing = dispatcher.routing()
    assert tuple(routing["combine_weights"].shape) == (2, 8, 4, slots)
    y, out = layer(x, return_routing=True)
    assert tuple(out["expert_outputs"].shape) == (4, 2 * slots, 6)
    assert tuple(y.shape) == x.shape
