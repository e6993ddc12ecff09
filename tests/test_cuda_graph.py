"""patch(model, cuda_graph=True): signatures, static buffers, cloned outputs, eager fallbacks, unpatch.

The CPU has no CUDA graphs: `capture` is replaced by a stand-in with the same contract (a warm-up run, then a
replay that recomputes from the static input buffers into the SAME output tensors, as a graph overwrites its
static outputs), so every rule of the wrapper is exercised; the real capture runs in the GPU test."""

import contextlib
import types

import pytest
import torch
from torch.utils import _pytree as pytree

import dcgen_kernels
from dcgen_kernels import _backend
from dcgen_kernels.patching import cuda_graph
from tests.helpers import rel_l2, tiny_dcae, tiny_flux, tiny_flux_inputs, tiny_sana, tiny_sana_inputs


@pytest.fixture(autouse=True)
def fresh_one_time_warnings(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", set())


class FakeGraphs:
    def __init__(self, fail: bool = False):
        self.captures = self.replays = 0
        self.fail = fail

    def capture(self, run, device):
        self.captures += 1
        warm = run()
        if self.fail:
            raise cuda_graph.CaptureError(RuntimeError("operation not permitted when stream is capturing"), warm)
        static = run()

        def replay():
            self.replays += 1
            # a real graph writes its outputs whatever mode they were made in (inference tensors after an
            # inference_mode capture); the stand-in copies, which needs that mode
            leaves = [t for t in pytree.tree_leaves(static) if isinstance(t, torch.Tensor)]
            with torch.inference_mode() if any(t.is_inference() for t in leaves) else contextlib.nullcontext():
                for buffer, fresh in zip(leaves, [t for t in pytree.tree_leaves(run()) if isinstance(t, torch.Tensor)]):
                    buffer.copy_(fresh)
            return static
        return warm, replay


@pytest.fixture
def fake_graphs(monkeypatch):
    fake = FakeGraphs()
    monkeypatch.setattr(cuda_graph, "capture", fake.capture)
    monkeypatch.setattr(cuda_graph, "graph_unsupported_reason",
                        lambda tensors: "gradients are enabled" if torch.is_grad_enabled() else None)
    return fake


def _eager_out(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def _patched_output_then_graphed(model, inputs):
    """The patched model's eager output; the model is left patched with cuda_graph=True."""
    dcgen_kernels.patch(model, backend="reference")
    expected = _eager_out(model, inputs)
    dcgen_kernels.patch(model, backend="reference", cuda_graph=True)
    return expected


def test_replays_read_each_calls_inputs_and_return_fresh_tensors(fake_graphs):
    model = tiny_flux()
    dcgen_kernels.patch(model, backend="reference")
    first, second = tiny_flux_inputs(), tiny_flux_inputs()
    expected = [_eager_out(model, first), _eager_out(model, second)]
    dcgen_kernels.patch(model, backend="reference", cuda_graph=True)
    assert "CUDA graphs" in str(dcgen_kernels.patch_report(model))
    outs = [_eager_out(model, first), _eager_out(model, second), _eager_out(model, first)]  # capture, replay x2
    assert (fake_graphs.captures, fake_graphs.replays) == (1, 2)
    for got, want in zip(outs, expected + expected[:1]):
        assert torch.equal(got, want)
    outs[1].fill_(float("nan"))  # a caller's tensor is its own, not the graph's static output
    assert torch.equal(_eager_out(model, second), expected[1])


def test_new_signature_captures_again_and_too_many_run_eagerly(fake_graphs, monkeypatch):
    monkeypatch.setattr(cuda_graph, "MAX_GRAPHS", 2)
    model = tiny_flux()
    dcgen_kernels.patch(model, backend="reference", cuda_graph=True)
    for grid in (4, 6, 4):
        _eager_out(model, tiny_flux_inputs(grid=grid))
    assert fake_graphs.captures == 2 and fake_graphs.replays == 1
    inputs = tiny_flux_inputs(grid=8)
    with pytest.warns(RuntimeWarning, match="more than 2 input signatures"):
        got = _eager_out(model, inputs)
    dcgen_kernels.unpatch(model)
    dcgen_kernels.patch(model, backend="reference")
    assert torch.equal(got, _eager_out(model, inputs)) and fake_graphs.captures == 2


def test_failed_capture_runs_that_signature_eagerly(monkeypatch):
    fake = FakeGraphs(fail=True)
    monkeypatch.setattr(cuda_graph, "capture", fake.capture)
    monkeypatch.setattr(cuda_graph, "graph_unsupported_reason", lambda tensors: None)
    model, inputs = tiny_sana(), tiny_sana_inputs()
    expected = _patched_output_then_graphed(model, inputs)
    with pytest.warns(RuntimeWarning, match="capturing SanaTransformer2DModel's forward in a CUDA graph failed"):
        first = _eager_out(model, inputs)
    again = _eager_out(model, inputs)
    assert fake.captures == 1 and torch.equal(first, expected) and torch.equal(again, expected)


def test_grad_enabled_and_cpu_tensors_run_eagerly_with_a_warning():
    model, inputs = tiny_flux(), tiny_flux_inputs()
    expected = _patched_output_then_graphed(model, inputs)
    with pytest.warns(RuntimeWarning, match="not one CUDA device"):
        got = _eager_out(model, inputs)
    assert torch.equal(got, expected)
    assert "gradients are enabled" in cuda_graph.graph_unsupported_reason([torch.zeros(1)])


def test_unpatch_and_repatch_drop_the_graphs_and_restore_forward(fake_graphs):
    model, inputs = tiny_flux(), tiny_flux_inputs()
    dcgen_kernels.patch(model, backend="reference", cuda_graph=True)
    wrapper = cuda_graph.graphed(model)
    _eager_out(model, inputs)
    assert wrapper is not None and len(wrapper.graphs) == 1
    dcgen_kernels.patch(model, backend="reference", cuda_graph=True)  # again: modules may have changed
    assert cuda_graph.graphed(model) is not wrapper and not cuda_graph.graphed(model).graphs
    dcgen_kernels.patch(model, backend="reference")
    assert cuda_graph.graphed(model) is None and not dcgen_kernels.patch_report(model).cuda_graph
    dcgen_kernels.patch(model, backend="reference", cuda_graph=True)
    dcgen_kernels.unpatch(model)
    assert "forward" not in model.__dict__ and cuda_graph.graphed(model) is None


def test_torch_save_load_keeps_the_graphed_forward_without_its_graphs(fake_graphs):
    import io

    model, inputs = tiny_flux(), tiny_flux_inputs()
    expected = _patched_output_then_graphed(model, inputs)
    _eager_out(model, inputs)  # one captured signature: graphs are not state to save
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    wrapper = cuda_graph.graphed(loaded)
    assert wrapper is not None and not wrapper.graphs and len(cuda_graph.graphed(model).graphs) == 1
    assert torch.equal(_eager_out(loaded, inputs), expected) and len(wrapper.graphs) == 1  # captured again
    dcgen_kernels.unpatch(loaded)
    assert not any("forward" in vars(m) for m in loaded.modules())


def test_sana_graphs_are_keyed_by_the_caption_masks_plan(fake_graphs, monkeypatch):
    """One graph per key-padding plan of the caption mask (ops/key_padding_attention.graph_plan); while capturing,
    the cross-attentions follow the plan made before the capture, never one from the mask on the host."""
    import sys

    kpa = sys.modules["dcgen_kernels.ops.key_padding_attention"]
    model, inputs = tiny_sana(), tiny_sana_inputs()
    mask = inputs["encoder_attention_mask"]  # the second caption is padded
    other = mask.clone()
    other[0, 2:] = 0  # another mask, the same plan: all keys, masked
    full = torch.ones_like(mask)  # every key kept: no mask for SDPA, another graph
    masks = (mask, other, full, other)
    dcgen_kernels.patch(model, backend="reference")
    expected = [_eager_out(model, dict(inputs, encoder_attention_mask=m)) for m in masks]
    dcgen_kernels.patch(model, backend="reference", cuda_graph=True)
    captured = []

    def capture(run, device):  # FakeGraphs' contract, with the capture run seen as capturing
        fake_graphs.captures += 1
        warm = run()
        host_plan, capturing, masked_call = kpa._plan, kpa._capturing, kpa.key_padding_attention_reference
        kpa._plan = lambda m: pytest.fail("planned on the host while capturing")
        kpa.key_padding_attention_reference = lambda *a: pytest.fail("the plan handed in was not used")
        kpa._capturing = lambda t: True
        try:
            captured.append(run())
        finally:
            kpa._plan, kpa._capturing, kpa.key_padding_attention_reference = host_plan, capturing, masked_call

        def replay():
            fake_graphs.replays += 1
            return run()
        return warm, replay

    monkeypatch.setattr(cuda_graph, "capture", capture)
    outs = [_eager_out(model, dict(inputs, encoder_attention_mask=m)) for m in masks]
    assert (fake_graphs.captures, fake_graphs.replays) == (2, 2)
    assert sorted(key[-1] for key in cuda_graph.graphed(model).graphs) == [("keys", 5, False, 5), ("keys", 5, True, 5)]
    for got, want in zip(outs, expected):
        assert rel_l2(got, want) < 1e-6
    for got, want in zip(captured, (expected[0], expected[2])):
        assert rel_l2(got[0], want) < 1e-6


def test_capture_and_replay_run_on_the_models_gpu(monkeypatch):
    """torch.cuda.graph and CUDAGraph.replay use the current device's streams: a model on cuda:1 while cuda:0 is
    current is captured and replayed with cuda:1 current (torch.cuda's stream and graph calls are stood in for)."""
    current = [torch.device("cuda:0")]
    events = []

    @contextlib.contextmanager
    def device(d):
        current.append(torch.device(d))
        try:
            yield
        finally:
            current.pop()

    class Stream:
        def __init__(self, *args):
            pass

        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            events.append(("replay", current[-1]))

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())
    warm, replay = cuda_graph.capture(lambda: events.append(("run", current[-1])) or len(events),
                                      torch.device("cuda:1"))
    assert replay() == 2 and warm == 1
    assert events == [("run", torch.device("cuda:1"))] * 2 + [("replay", torch.device("cuda:1"))]
    assert current == [torch.device("cuda:0")]


def test_bad_cuda_graph_arguments():
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        dcgen_kernels.patch(tiny_flux(), cuda_graph="yes")
    with pytest.raises(ValueError, match="no transformer blocks"):
        dcgen_kernels.patch(tiny_dcae(), cuda_graph=True)


@pytest.mark.gpu
def test_gpu_graphed_flux_step_equals_eager_and_replays():
    model = tiny_flux(dtype=torch.bfloat16, device="cuda")
    first, second = (tiny_flux_inputs(dtype=torch.bfloat16, device="cuda") for _ in range(2))
    dcgen_kernels.patch(model)
    expected = [_eager_out(model, first), _eager_out(model, second)]
    dcgen_kernels.patch(model, cuda_graph=True)
    outs = [_eager_out(model, first), _eager_out(model, second), _eager_out(model, first)]
    wrapper = cuda_graph.graphed(model)
    assert len(wrapper.graphs) == 1 and next(iter(wrapper.graphs.values())) is not None  # captured, not eager
    for got, want in zip(outs, expected + expected[:1]):
        assert torch.equal(got, want)


@pytest.mark.gpu
def test_gpu_graphed_sana_step_with_padded_captions():
    model = tiny_sana(dtype=torch.bfloat16, device="cuda")
    inputs = tiny_sana_inputs(dtype=torch.bfloat16, device="cuda")  # the second caption is padded
    dcgen_kernels.patch(model)
    expected = _eager_out(model, inputs)
    dcgen_kernels.patch(model, cuda_graph=True)
    _eager_out(model, inputs)  # capture
    padded = dict(inputs, encoder_attention_mask=inputs["encoder_attention_mask"].clone())
    padded["encoder_attention_mask"][0, 2:] = 0  # another mask than at capture time
    dcgen_kernels.patch(model)
    expected_padded = _eager_out(model, padded)
    dcgen_kernels.patch(model, cuda_graph=True)
    _eager_out(model, inputs)
    got, got_padded = _eager_out(model, inputs), _eager_out(model, padded)
    assert next(iter(cuda_graph.graphed(model).graphs.values())) is not None  # captured, not eager
    assert rel_l2(got, expected) < 1e-2 and rel_l2(got_padded, expected_padded) < 1e-2


def test_stale_graphs_are_dropped_and_capture_modes_mix(fake_graphs):
    """A graph holds the parameters' addresses and the processors it ran: new weight storage (model.to, assign=True
    loads, LoRA fuses) or a processor swap capture again, as does another autocast state. Buffers made under
    inference_mode take a later no_grad call's inputs."""
    import copy

    model, inputs = tiny_flux(), tiny_flux_inputs()
    dcgen_kernels.patch(model, backend="reference", cuda_graph=True)
    with torch.inference_mode():
        expected = model(**inputs)[0]
    assert torch.equal(_eager_out(model, inputs), expected)  # replayed under no_grad
    assert (fake_graphs.captures, fake_graphs.replays) == (1, 1)
    for p in model.parameters():
        p.data = p.data.clone()
    _eager_out(model, inputs)  # its warm-up places the fused projections again: the graph holds their new addresses
    _eager_out(model, inputs)
    assert (fake_graphs.captures, fake_graphs.replays) == (2, 2)  # a replay, not a second capture
    attn = model.transformer_blocks[0].attn
    attn.processor = copy.copy(attn.processor)
    _eager_out(model, inputs)
    _eager_out(model, inputs)
    assert (fake_graphs.captures, fake_graphs.replays) == (3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _eager_out(model, inputs)
    assert fake_graphs.captures == 4


def _eager_with_grad(model, inputs):
    """The wrapper's eager path (the stand-in graphs decline grad mode), as the expected output."""
    with pytest.warns(RuntimeWarning, match="gradients are enabled") if not _backend._warned else \
            contextlib.nullcontext():
        return model(**inputs)[0].detach()


def test_a_swapped_submodule_captures_again(fake_graphs):
    """A module replaced after capture (a LoRA layer injected unfused, a layer swapped by hand): its parameters are
    not among those the graph recorded, so the swap itself must drop the graphs."""
    import copy

    model, inputs = tiny_flux(), tiny_flux_inputs()
    dcgen_kernels.patch(model, backend="reference", cuda_graph=True)
    _eager_out(model, inputs)
    _eager_out(model, inputs)
    assert (fake_graphs.captures, fake_graphs.replays) == (1, 1)
    ff = model.transformer_blocks[0].ff
    swapped = copy.deepcopy(ff.net[2])
    with torch.no_grad():
        swapped.weight.mul_(2)
    ff.net[2] = swapped
    got = _eager_out(model, inputs)
    assert fake_graphs.captures == 2
    assert torch.equal(got, _eager_with_grad(model, inputs))


def test_adapter_selection_captures_again_and_hooked_submodules_run_eagerly(fake_graphs):
    """peft's adapter selection, disabled flag and scalings are Python attributes a replay would bake in (the
    stand-in replays re-run, so captures are counted); a replay runs no forward hook of a submodule, so a model
    with one runs eagerly (the model's own hooks run around the graphed forward)."""
    from peft import LoraConfig

    model, inputs = tiny_flux(), tiny_flux_inputs()
    for name in ("a", "b"):
        model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "proj_mlp"], init_lora_weights=False),
                          adapter_name=name)
    dcgen_kernels.patch(model, backend="reference", cuda_graph=True)
    _eager_out(model, inputs)
    _eager_out(model, inputs)
    assert (fake_graphs.captures, fake_graphs.replays) == (1, 1)
    captures = 1
    for change in (lambda: model.set_adapters(["a", "b"], [0.2, 1.5]), lambda: model.set_adapters("a"),
                   model.disable_adapters):
        change()
        _eager_out(model, inputs)
        _eager_out(model, inputs)
        captures += 1
        assert fake_graphs.captures == captures
    calls = []
    root_hook = model.register_forward_hook(lambda *args: calls.append("model"))
    _eager_out(model, inputs)
    assert fake_graphs.captures == captures and calls == ["model"]  # replayed, the model's hook around it
    hook = model.transformer_blocks[0].register_forward_hook(lambda *args: calls.append("block"))
    with pytest.warns(RuntimeWarning, match="a submodule has forward hooks"):
        _eager_out(model, inputs)
    _eager_out(model, inputs)
    assert fake_graphs.captures == captures and calls == ["model", "block", "model", "block", "model"]
    hook.remove()
    root_hook.remove()
    _eager_out(model, inputs)
    _eager_out(model, inputs)
    assert fake_graphs.captures == captures + 1 and fake_graphs.replays >= 2


def test_call_values_and_input_dtypes_are_part_of_the_signature(fake_graphs):
    model, inputs = tiny_flux(), tiny_flux_inputs()
    inputs.pop("return_dict")
    dcgen_kernels.patch(model, backend="reference", cuda_graph=True)
    with torch.no_grad():
        as_tuple = model(**inputs, return_dict=False)
        as_output = model(**inputs, return_dict=True)
        assert isinstance(as_tuple, tuple) and hasattr(as_output, "sample") and fake_graphs.captures == 2
        model(**{**inputs, "timestep": inputs["timestep"].double()}, return_dict=False)  # same shape, other dtype
        assert fake_graphs.captures == 3 and fake_graphs.replays == 0
        assert torch.equal(model(**inputs, return_dict=True).sample, as_tuple[0]) and fake_graphs.replays == 1


def test_dropping_the_graphs_restores_the_forward_they_wrapped(fake_graphs):
    """patch() puts FLUX's latent-packing model forward on the instance; graphs wrap it, and dropping them (patch
    without cuda_graph) must put that forward back, not the class's."""
    from dcgen_kernels.patching.latents import _flux_model_forward

    model, inputs = tiny_flux(), tiny_flux_inputs()
    dcgen_kernels.patch(model, backend="reference")
    installed = model.__dict__["forward"]
    assert installed.func is _flux_model_forward
    dcgen_kernels.patch(model, backend="reference", cuda_graph=True)
    assert cuda_graph.graphed(model).forward is installed
    _eager_out(model, inputs)
    dcgen_kernels.patch(model, backend="reference")
    assert model.__dict__["forward"] is installed


def test_parameters_or_buffers_off_the_inputs_device_run_eagerly(fake_graphs):
    """Offloaded weights (accelerate / group offloading move them per call) would be baked into a graph at the
    addresses of one call: such a model runs eagerly, warned once."""
    model, inputs = tiny_flux(), tiny_flux_inputs()
    expected = _patched_output_then_graphed(model, inputs)
    model.register_buffer("offloaded", torch.zeros(1, device="meta"))  # not on the inputs' device
    with pytest.warns(RuntimeWarning, match="not on the inputs' GPU \\(offloaded\\?\\)"):
        got = _eager_out(model, inputs)
    assert torch.equal(got, expected) and fake_graphs.captures == 0


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x, n=1, cfg=(), a=None, b=None):
        out = x * n + sum(cfg)
        if a is not None:
            out = out + a
        if b is not None:
            out = out + 10 * b
        return out


def _toy():
    model = Toy().eval()
    cuda_graph.enable(model)
    return model


def test_strides_and_batch_size_are_part_of_the_signature(fake_graphs):  # M04, M06
    model = _toy()
    with torch.no_grad():
        model(torch.randn(4, 3))
        transposed = torch.randn(3, 4).t()  # same shape, other strides
        assert torch.equal(model(transposed), transposed)
        assert fake_graphs.captures == 2
        model(torch.randn(1, 4, 3))
        batch2 = torch.randn(2, 4, 3)  # same strides, other batch size
        assert torch.equal(model(batch2), batch2) and fake_graphs.captures == 4


def test_a_value_equal_to_the_captured_one_but_of_another_type_captures_again(fake_graphs):  # M09
    model, x = _toy(), torch.arange(4)
    with torch.no_grad():
        assert model(x, 2).dtype == torch.int64
        out = model(x, 2.0)
    assert out.dtype == torch.float32 and fake_graphs.captures == 2


class Bag:
    """An argument hashed by identity whose content changes between calls."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


@pytest.mark.parametrize("make_cfg, changed", [(lambda: {1}, lambda cfg: cfg.add(2)),
                                               (lambda: Bag([1]), lambda cfg: cfg.items.append(2))],
                         ids=["unhashable", "hashed_by_identity"])
def test_values_a_signature_cannot_compare_run_eagerly(fake_graphs, make_cfg, changed):
    """A set's repr or an object's identity says nothing of what it holds at the next call: such a call runs
    eagerly, warned once, and sees the argument's current content."""
    model, x, cfg = _toy(), torch.zeros(2), make_cfg()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match=f"type {type(cfg).__name__} is neither a tensor nor a "
                                                             "value hashed by its content"):
        assert torch.equal(model(x, cfg=cfg), torch.ones(2))
    changed(cfg)
    with torch.no_grad():
        assert torch.equal(model(x, cfg=cfg), torch.full((2,), 3.0))
    assert fake_graphs.captures == 0


def test_float_values_are_keyed_by_their_bits(fake_graphs):
    """NaN != NaN: keyed by value, a NaN argument would capture again on every call; -0.0 == 0.0, yet 1 / -0.0 is
    -inf."""
    model = Toy().eval()
    model.forward = types.MethodType(lambda self, x, n=1.0, a=None: x / n, model)
    cuda_graph.enable(model)
    x = torch.ones(2)
    with torch.no_grad():
        model(x, float("nan"))
        assert model(x, float("nan")).isnan().all()
        assert (fake_graphs.captures, fake_graphs.replays) == (1, 1)
        assert torch.equal(model(x, 0.0), torch.full((2,), float("inf")))
        assert torch.equal(model(x, -0.0), torch.full((2,), -float("inf"))) and fake_graphs.captures == 3
        model(x, a=None)  # None is hashed by identity, and keyed as it is
        model(x, a=None)
    assert (fake_graphs.captures, fake_graphs.replays) == (4, 2)


class Processor:
    pass


def test_storage_reinterpreted_in_place_or_a_processor_at_a_freed_ones_address_captures_again(fake_graphs):
    """Kernels a graph captured bake in their weights' dtypes and shapes besides the addresses, which a view keeps;
    and a new processor (or peft scaling object) may be allocated where a freed one lived, so the state must not
    compare ids alone."""
    model, x = _toy(), torch.randn(2, 3)
    model.processor = Processor()
    model.register_buffer("table", torch.zeros(3, 3))
    with torch.no_grad():
        model(x)
        model.table.data = model.table.data.view(torch.int32)
        model(x)
        model.table.data = model.table.data.view(9)
        model(x)
        assert fake_graphs.captures == 3
        model.processor = None
        model.processor = Processor()
        model(x)
        model.lin.__dict__.update(_active_adapter="default", scaling={"default": Processor()})  # peft's layer state
        model(x)
        model.lin.scaling["default"] = None
        model.lin.scaling["default"] = Processor()
        model(x)
    assert (fake_graphs.captures, fake_graphs.replays) == (6, 0)


def test_argument_structure_is_part_of_the_signature(fake_graphs):  # M11
    model, x, t = _toy(), torch.zeros(2), torch.ones(2)
    with torch.no_grad():
        assert torch.equal(model(x, a=t), t)
        assert torch.equal(model(x, b=t), 10 * t)  # same leaves, other keyword
    assert fake_graphs.captures == 2


def test_autocast_dtype_is_part_of_the_signature(fake_graphs):  # M02
    model = Toy().eval()
    model.forward = types.MethodType(lambda self, x: self.lin(x), model)
    cuda_graph.enable(model)
    x = torch.randn(2, 3)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x).dtype == torch.bfloat16
        with torch.autocast("cpu", dtype=torch.float16):
            assert model(x).dtype == torch.float16
    assert fake_graphs.captures == 2


def test_a_warm_up_that_moves_weights_drops_the_graphs_captured_before(fake_graphs):  # M45
    """The first call of a shape re-places the weight (as fused projections are placed after model.to): the graph
    captured earlier for another shape holds the old address and must be captured again."""
    model = Toy().eval()
    seen = set()

    def forward(self, x):
        if x.shape not in seen:
            seen.add(x.shape)
            self.lin.weight.data = self.lin.weight.data.clone()
        return self.lin(x)

    model.forward = types.MethodType(forward, model)
    cuda_graph.enable(model)
    with torch.no_grad():
        model(torch.randn(2, 3))
        model(torch.randn(4, 3))
        assert fake_graphs.captures == 2
        model(torch.randn(2, 3))
    assert fake_graphs.captures == 3 and len(cuda_graph.graphed(model).graphs) == 2


def test_each_eager_reason_warns_once(fake_graphs):  # M53
    model, x = _toy(), torch.randn(2, 3)
    with pytest.warns(RuntimeWarning, match="gradients are enabled"):
        model(x)
    model.lin.register_forward_hook(lambda *args: None)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="a submodule has forward hooks"):
        model(x)


def test_each_capture_failure_cause_warns(monkeypatch):  # M59
    causes = iter(["first cause", "second cause"])

    def capture(run, device):
        raise cuda_graph.CaptureError(RuntimeError(next(causes)), run())

    monkeypatch.setattr(cuda_graph, "capture", capture)
    monkeypatch.setattr(cuda_graph, "graph_unsupported_reason", lambda tensors: None)
    model = _toy()
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="first cause"):
            model(torch.randn(2, 3))
        with pytest.warns(RuntimeWarning, match="second cause"):
            model(torch.randn(4, 3))


def test_forward_pre_hooks_on_a_submodule_run_eagerly(fake_graphs):  # M27
    model, x = _toy(), torch.randn(2, 3)
    model.lin.register_forward_pre_hook(lambda *args: None)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="a submodule has forward hooks"):
        model(x)
    assert fake_graphs.captures == 0


def test_graph_unsupported_reason_device_rules():  # M13, M14, M15
    on = lambda *devices: [types.SimpleNamespace(device=torch.device(d)) for d in devices]  # noqa: E731
    with torch.no_grad():
        assert "no device" in cuda_graph.graph_unsupported_reason([])
        assert "not one CUDA device" in cuda_graph.graph_unsupported_reason(on("cuda:0", "cpu"))
        assert "several devices" in cuda_graph.graph_unsupported_reason(on("cuda:0", "cuda:1"))
        assert cuda_graph.graph_unsupported_reason(on("cuda:1", "cuda:1")) is None


def _fake_torch_cuda(monkeypatch, events, fail=False):
    class Stream:
        def __init__(self, *args):
            self.name = "side" if args else "current"

        def wait_stream(self, other):
            events.append(f"{self.name} waits {other.name}")

    @contextlib.contextmanager
    def stream(s):
        events.append(f"enter {s.name}")
        yield
        events.append(f"exit {s.name}")

    @contextlib.contextmanager
    def graph(g):
        events.append("capture")
        yield
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: types.SimpleNamespace(replay=lambda: None))
    monkeypatch.setattr(torch.cuda, "graph", graph)


def test_capture_warms_up_on_a_side_stream_then_captures(monkeypatch):  # M49, M50
    events = []
    _fake_torch_cuda(monkeypatch, events)
    warm, replay = cuda_graph.capture(lambda: events.append("run") or len(events), torch.device("cuda:0"))
    assert events == ["side waits current", "enter side", "run", "exit side", "current waits side", "capture", "run"]
    assert warm == 3 and replay() == 7


def test_a_failing_real_capture_raises_capture_error_with_the_warm_up_output(monkeypatch):  # M47
    _fake_torch_cuda(monkeypatch, [], fail=True)
    outs = iter(["warm", "captured"])
    with pytest.raises(cuda_graph.CaptureError, match="operation not permitted") as err:
        cuda_graph.capture(lambda: next(outs), torch.device("cuda:0"))
    assert err.value.output == "warm"


def test_enable_twice_wraps_the_forward_once(fake_graphs):  # M54
    model = Toy()
    cuda_graph.enable(model)
    cuda_graph.enable(model)
    assert not isinstance(cuda_graph.graphed(model).forward, cuda_graph.GraphedForward)
    assert cuda_graph.disable(model) and "forward" not in model.__dict__


def _flux_with_adapters():
    from peft import LoraConfig

    model = tiny_flux()
    for name in ("a", "b"):
        model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "proj_mlp"], init_lora_weights=False),
                          adapter_name=name)
    return model, tiny_flux_inputs()


def test_switching_to_another_adapter_of_the_same_scaling_captures_again(fake_graphs):  # M21
    model, inputs = _flux_with_adapters()
    model.set_adapters("a")
    dcgen_kernels.patch(model, backend="reference", cuda_graph=True)
    _eager_out(model, inputs)
    model.set_adapters("b")
    _eager_out(model, inputs)
    assert fake_graphs.captures == 2


def test_changing_only_adapter_weights_captures_again(fake_graphs):  # M24, M25
    model, inputs = _flux_with_adapters()
    model.set_adapters(["a", "b"], [0.2, 1.5])
    dcgen_kernels.patch(model, backend="reference", cuda_graph=True)
    _eager_out(model, inputs)
    model.set_adapters(["a", "b"], [0.3, 1.5])
    _eager_out(model, inputs)
    assert fake_graphs.captures == 2


def test_merging_adapters_in_place_captures_again(fake_graphs):  # M23
    from peft.tuners.tuners_utils import BaseTunerLayer

    model, inputs = _flux_with_adapters()
    model.set_adapters("a")
    dcgen_kernels.patch(model, backend="reference", cuda_graph=True)
    _eager_out(model, inputs)
    ptrs = [p.data_ptr() for p in model.parameters()]
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    assert ptrs == [p.data_ptr() for p in model.parameters()]  # in place: only merged_adapters shows it
    _eager_out(model, inputs)
    assert fake_graphs.captures == 2


def test_device_is_part_of_the_signature():  # M07
    leaves, spec = [torch.zeros(2)], None
    cpu, _ = cuda_graph._signature(spec, leaves, torch.device("cpu"))
    assert cpu != cuda_graph._signature(spec, [torch.zeros(2, device="meta")], torch.device("cpu"))[0]


def test_train_and_eval_capture_again(fake_graphs):
    """A graph bakes in dropout's and batch norm's mode: train() / eval() drop it."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5)).eval()
    cuda_graph.enable(model)
    x = torch.randn(8, 3)
    with torch.no_grad():
        model(x)
        model.train()
        model(x)
        model.eval()
        model(x)
    assert fake_graphs.captures == 3 and fake_graphs.replays == 0


def test_global_module_hooks_run_eagerly(fake_graphs):
    model, calls = _toy(), []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: calls.append(module))
    try:
        with torch.no_grad(), pytest.warns(RuntimeWarning, match="global module forward hooks"):
            model(torch.randn(2, 3))
            model(torch.randn(2, 3))
    finally:
        handle.remove()
    assert fake_graphs.captures == 0 and calls.count(model) == 2
