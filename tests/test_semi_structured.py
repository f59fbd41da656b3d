"""2:4 conversion to torch's semi-structured sparse tensors.

The planning, bookkeeping and refusals run on CPU. The conversion itself needs
an NVIDIA GPU (Ampere or newer); those tests are skipped elsewhere, with the reason.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from compressed_tensors.quantization import preset_name_to_scheme
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

from tamp_modifier.deploy.semi_structured import (
    apply_plan,
    is_2_of_4,
    plan,
    resolve_backend,
    shape_constraint,
    to_semi_structured,
)
from tamp_modifier.testing.synthetic import build_tiny_model, make_calibration_dataset
from tamp_modifier.text_decoder import language_linears


def prune_2_of_4(weight: torch.Tensor) -> torch.Tensor:
    """The 2 smallest |w| of every 4 consecutive weights of a row set to zero (a copy)."""
    rows, cols = weight.shape
    groups = weight.detach().clone().reshape(rows, cols // 4, 4)
    smallest = groups.float().abs().argsort(dim=-1)[..., :2]
    return groups.scatter(-1, smallest, 0).reshape(rows, cols)


def brute_force_share(weight: torch.Tensor, n: int, m: int) -> float:
    """Share of m-groups with at least n zeros, counted one group at a time in Python."""
    good = total = 0
    for row in weight.tolist():
        for start in range(0, len(row), m):
            total += 1
            good += sum(value == 0 for value in row[start:start + m]) >= n
    return good / total


def pruned_model(family="llava", dtype=torch.float16, **kwargs):
    model = build_tiny_model(family, dtype=dtype, **kwargs)
    with torch.no_grad():
        for module in language_linears(model).values():
            module.weight.copy_(prune_2_of_4(module.weight))
    return model


def all_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


# ----------------------------------------------------------------------------- the pattern


def test_is_2_of_4_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        weight = prune_2_of_4(torch.randn(8, 32, generator=gen))
        if trial % 2:  # a third non-zero in one random group
            row, group = (int(i) for i in torch.randint(8, (2,), generator=gen))
            zero = int((weight[row, 4 * group:4 * group + 4] == 0).nonzero()[0])
            weight[row, 4 * group + zero] = 1.0
        assert is_2_of_4(weight) == (brute_force_share(weight, 2, 4) == 1.0) == (trial % 2 == 0)
    assert not is_2_of_4(torch.zeros(8, 6))  # rows cannot be cut into groups of 4
    assert is_2_of_4(torch.zeros(8, 8))  # more zeros than needed is still 2:4


# ----------------------------------------------------------------------------- planning and bookkeeping


def test_plan_converts_every_language_linear_and_records_the_rest():
    model = pruned_model()
    before = {n: m.weight.detach().clone() for n, m in all_linears(model).items()}
    report = plan(model)
    language = language_linears(model)

    assert [r.name for r in report.converted] == list(language)
    for record in report.converted:
        weight = language[record.name].weight
        assert record.shape == tuple(weight.shape) and record.params == weight.numel()
        assert record.share_2_of_4 == 1.0 and record.language and record.reason is None
    skipped = {r.name: r for r in report.skipped}
    assert set(skipped) == set(all_linears(model)) - set(language)
    assert any("vision_tower" in n for n in skipped) and "lm_head" in skipped
    assert all("outside the language model" in r.reason for r in skipped.values())

    total = sum(m.weight.numel() for m in language.values())
    assert report.language_params == total == report.converted_params
    assert report.converted_share == 1.0
    assert (report.backend, report.dtype, report.applied) == ("cusparselt", "float16", False)
    # plan is pure: nothing changed
    for name, module in all_linears(model).items():
        assert type(module.weight) is torch.nn.Parameter and torch.equal(module.weight, before[name])


def test_plan_skips_layers_that_are_not_2_of_4_and_counts_the_share():
    model = pruned_model()
    layers = language_linears(model)
    dense_name = "model.language_model.layers.0.mlp.down_proj"
    half_name = "model.language_model.layers.1.self_attn.q_proj"
    with torch.no_grad():
        layers[dense_name].weight.copy_(torch.randn_like(layers[dense_name].weight))
        half = layers[half_name].weight
        half[: half.shape[0] // 2] = torch.randn_like(half[: half.shape[0] // 2])
    report = plan(model)

    skipped = {r.name: r for r in report.skipped}
    for name in (dense_name, half_name):
        expected = brute_force_share(layers[name].weight, 2, 4)
        assert skipped[name].share_2_of_4 == pytest.approx(expected)
        assert skipped[name].reason == f"not 2:4 ({100 * expected:.1f}% of its 4-groups are 2:4)"
        assert skipped[name].language
    assert skipped[dense_name].share_2_of_4 < 0.01 and skipped[half_name].share_2_of_4 == pytest.approx(0.5)
    converted = {r.name for r in report.converted}
    assert converted == set(layers) - {dense_name, half_name}
    total = sum(m.weight.numel() for m in layers.values())
    left_out = layers[dense_name].weight.numel() + layers[half_name].weight.numel()
    assert report.converted_share == pytest.approx((total - left_out) / total)
    assert f"{100 * (total - left_out) / total:.1f}%" in report.format_table()

    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["converted_params"] == total - left_out
    assert {r["name"] for r in as_json["skipped"]} == {r.name for r in report.skipped}


def test_ignore_keeps_layers_dense_and_says_so():
    model = pruned_model()
    report = plan(model, ignore=["re:.*mlp.*"])
    assert all("mlp" not in r.name for r in report.converted)
    mlp = [r for r in report.skipped if ".mlp." in r.name and "language_model" in r.name]
    assert len(mlp) == 6 and all(r.reason == "matched by ignore" for r in mlp)


def test_targeted_layer_that_is_not_2_of_4_is_refused_with_its_share():
    model = pruned_model()
    name = "model.language_model.layers.0.mlp.down_proj"
    weight = model.get_submodule(name).weight
    with torch.no_grad():
        weight[:16] = torch.randn_like(weight[:16])
    share = brute_force_share(weight, 2, 4)
    with pytest.raises(ValueError, match="cannot run on 2:4 kernels") as error:
        plan(model, targets=["re:.*language_model.*mlp.*"])
    assert f"{name}: not 2:4 ({100 * share:.1f}% of its 4-groups are 2:4)" in str(error.value)
    assert "tamp_2of4" in str(error.value)
    # the other MLP layers are 2:4 and the same targets without the bad layer plan fine
    report = plan(model, targets=["re:.*language_model.*mlp.*"], ignore=[name])
    assert len(report.converted) == 5 and all(".mlp." in r.name for r in report.converted)
    assert any(r.name == "lm_head" and r.reason == "not targeted" for r in report.skipped)
    # targeting the vision tower, which nobody pruned, names its share too
    with pytest.raises(ValueError, match=r"vision_tower.*not 2:4"):
        plan(model, targets=["re:.*vision_tower.*fc1"])


def test_targets_must_match_linears():
    model = pruned_model()
    with pytest.raises(ValueError, match="match no nn.Linear"):
        plan(model, targets=["re:.*no_such_layer.*"])
    with pytest.raises(ValueError, match="match no nn.Linear"):
        plan(model, targets=["LlamaMLP"])


def test_dtype_refusals():
    fp32 = pruned_model(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"torch.float32 weights.*float16 or bfloat16.*dtype=torch.float16"):
        plan(fp32)
    for bad in (torch.float32, torch.float64, torch.int8):
        with pytest.raises(ValueError, match=f"float16 or bfloat16 .*got {bad}"):
            plan(fp32, dtype=bad)
    report = plan(fp32, dtype=torch.bfloat16)  # the caller asks for a cast: planned, not refused
    assert report.dtype == "bfloat16" and len(report.converted) == 14
    assert fp32.lm_head.weight.dtype == torch.float32  # planning does not cast


def test_quantized_layers_are_refused():
    model = pruned_model()
    module = model.get_submodule("model.language_model.layers.1.mlp.up_proj")
    module.quantization_scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    with pytest.raises(ValueError, match=r"quantization scheme \(first: model.language_model.layers.1.mlp"):
        plan(model)


class SmallLinears(torch.nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(i, o, bias=False) for o, i in shapes)
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.copy_(prune_2_of_4(layer.weight))
        self.half()


def test_shape_constraints_are_torchs():
    # torch 2.13, torch/sparse/semi_structured.py: sparse_min_rows, sparse_min_cols
    assert shape_constraint("cusparselt", torch.float16) == (16, 16)
    assert shape_constraint("cusparselt", torch.bfloat16) == (16, 16)
    assert shape_constraint("cutlass", torch.float16) == (32, 64)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        shape_constraint("cutlass", torch.float32)


def test_shapes_the_kernels_cannot_take_are_skipped_or_refused():
    # (out, in): fine everywhere; rows 48 (cuSPARSELt yes, CUTLASS no); in 40 (a multiple of 4, not 16);
    # rows 8 (below 16)
    model = SmallLinears([(64, 64), (48, 64), (64, 40), (8, 64)])
    names = [f"layers.{i}" for i in range(4)]
    assert all(is_2_of_4(layer.weight) for layer in model.layers)

    report = plan(model, backend="cusparselt")
    assert [r.name for r in report.converted] == names[:2]
    skipped = {r.name: r.reason for r in report.skipped}
    assert skipped[names[2]].startswith("shape 64x40:") and "16x16" in skipped[names[2]]
    assert skipped[names[3]].startswith("shape 8x64:")

    report = plan(model, backend="cutlass")
    assert [r.name for r in report.converted] == names[:1]
    assert "32x64" in {r.name: r.reason for r in report.skipped}[names[1]]

    with pytest.raises(ValueError, match=r"layers.2: shape 64x40"):
        plan(model, targets=["re:layers\\.[0-2]$"])


# ----------------------------------------------------------------------------- device refusals


def test_cpu_model_is_refused_before_anything_changes():
    model = pruned_model()
    with pytest.raises(RuntimeError, match=r"NVIDIA GPUs \(CUDA\); the model is on cpu.*model.to\('cuda'"):
        to_semi_structured(model)
    report = plan(model)
    with pytest.raises(RuntimeError, match="only on NVIDIA GPUs"):
        apply_plan(model, report)
    assert not report.applied
    assert all(type(m.weight) is torch.nn.Parameter and m.weight.dtype == torch.float16
               for m in all_linears(model).values())


def test_fp32_cpu_model_gets_the_device_error_first():
    with pytest.raises(RuntimeError, match="NVIDIA GPUs"):
        to_semi_structured(pruned_model(dtype=torch.float32))


@pytest.mark.parametrize(
    "backend,capability,cusparselt,expected",
    [
        ("auto", (8, 0), True, "cusparselt"),
        ("auto", (8, 6), False, "cutlass"),
        ("auto", (9, 0), True, "cusparselt"),
        ("cutlass", (8, 9), True, "cutlass"),
        ("auto", (7, 5), True, "Ampere or newer NVIDIA GPU .*has 7.5"),
        ("auto", (6, 1), True, "compute capability >= 8.0"),
        ("auto", (9, 0), False, "built for Ampere .* only"),
        ("cutlass", (9, 0), True, "built for Ampere .* only.*backend='cusparselt'"),
        ("cusparselt", (8, 0), False, "no cuSPARSELt.*backend='cutlass'"),
    ],
)
def test_resolve_backend_on_described_gpus(backend, capability, cusparselt, expected):
    args = dict(capability=capability, cusparselt_available=cusparselt, hip=False)
    if expected in ("cusparselt", "cutlass"):
        assert resolve_backend(backend, "cuda:0", **args) == expected
    else:
        with pytest.raises(RuntimeError, match=expected):
            resolve_backend(backend, "cuda:0", **args)


def test_resolve_backend_refuses_rocm_cpu_and_unknown_names():
    with pytest.raises(RuntimeError, match="NVIDIA GPUs.*ROCm"):
        resolve_backend("auto", "cuda:0", capability=(9, 0), cusparselt_available=True, hip=True)
    with pytest.raises(RuntimeError, match="the model is on mps"):
        resolve_backend("auto", "mps")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("triton", "cuda:0")
    with pytest.warns(UserWarning, match="cover 8.x and 9.x"):
        assert resolve_backend("auto", "cuda", capability=(12, 0), cusparselt_available=True, hip=False) \
            == "cusparselt"


# ----------------------------------------------------------------------------- the packing, on CPU


def test_what_plan_accepts_packs_exactly_and_what_it_refuses_does_not():
    """torch's CUTLASS packing is plain torch code, so it runs on CPU: every weight plan
    accepts survives packing and unpacking bit for bit; a group with 3 non-zeros loses one,
    which is why a non-2:4 layer is refused instead of converted."""
    model = pruned_model()
    report = plan(model, backend="cutlass")
    assert len(report.converted) == 14
    for record in report.converted:
        weight = model.get_submodule(record.name).weight.detach()
        packed, meta = sparse_semi_structured_from_dense_cutlass(weight)
        assert packed.shape == (weight.shape[0], weight.shape[1] // 2)
        assert torch.equal(sparse_semi_structured_to_dense_cutlass(packed, meta), weight)

    weight = model.get_submodule(report.converted[0].name).weight.detach().clone()
    weight[0, int((weight[0, :4] == 0).nonzero()[0])] = 0.5  # a third non-zero in the first group
    assert not is_2_of_4(weight)
    packed, meta = sparse_semi_structured_from_dense_cutlass(weight)
    assert not torch.equal(sparse_semi_structured_to_dense_cutlass(packed, meta), weight)


# ----------------------------------------------------------------------------- apply_plan, on CPU


class CpuCutlass(torch.sparse.SparseSemiStructuredTensorCUTLASS):
    """torch's CUTLASS sparse tensor, packed by torch's own (plain torch) packing code on CPU.

    It holds and unpacks weights like the real one but cannot multiply (that kernel is
    CUDA only), so apply_plan's bookkeeping can be checked without a GPU."""

    @classmethod
    def from_dense(cls, dense, alg_id=0):
        packed, meta = sparse_semi_structured_from_dense_cutlass(dense)
        return cls(dense.shape, packed=packed, meta=meta, packed_t=None, meta_t=None,
                   compressed_swizzled_bitmask=None)


@pytest.fixture
def cpu_kernels(monkeypatch):
    """Let apply_plan run on CPU: every device passes, and 'cutlass' packs with CpuCutlass."""
    import tamp_modifier.deploy.semi_structured as semi_structured

    real = semi_structured._sparse_class
    monkeypatch.setattr(semi_structured, "resolve_backend", lambda backend, device, **_: backend)
    monkeypatch.setattr(semi_structured, "_sparse_class", lambda b: CpuCutlass if b == "cutlass" else real(b))


def test_apply_plan_replaces_exactly_the_planned_weights(cpu_kernels):
    model = pruned_model(dtype=torch.float32)
    name_dense = "model.language_model.layers.1.mlp.gate_proj"
    with torch.no_grad():
        model.get_submodule(name_dense).weight.normal_()
    before = {n: m.weight.detach().clone() for n, m in all_linears(model).items()}
    report = plan(model, dtype=torch.float16, backend="cutlass")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*prototype stage")  # silenced by apply_plan
        assert apply_plan(model, report) is report
    assert report.applied
    converted = {r.name for r in report.converted}
    assert converted == set(language_linears(model)) - {name_dense}
    for name, module in all_linears(model).items():
        if name in converted:
            assert isinstance(module.weight, CpuCutlass) and not module.weight.requires_grad
            assert torch.equal(module.weight.to_dense(), before[name].half())
        else:
            assert type(module.weight) is torch.nn.Parameter
            assert torch.equal(module.weight, before[name].half())  # cast with the model, still dense
    assert all(p.dtype == torch.float16 for p in model.parameters())
    with pytest.raises(RuntimeError, match="already been applied"):
        apply_plan(model, report)
    again = plan(model, backend="cutlass")  # a second plan on the converted model converts nothing
    assert not again.converted and again.converted_share == 0.0
    assert {r.name for r in again.skipped if r.reason.startswith("already converted")} == converted
    with pytest.raises(ValueError, match=r"gate_proj: already converted"):
        plan(model, targets=["re:.*layers.0.mlp.gate_proj"], backend="cutlass")


def test_apply_plan_refuses_a_stale_plan_and_converts_nothing(cpu_kernels):
    model = pruned_model()
    report = plan(model, backend="cutlass")
    name = report.converted[3].name
    with torch.no_grad():
        model.get_submodule(name).weight.normal_()
    share = brute_force_share(model.get_submodule(name).weight, 2, 4)
    with pytest.raises(ValueError, match=rf"changed since plan\(\): {name}: not 2:4 \({100 * share:.1f}%"):
        apply_plan(model, report)
    assert not report.applied
    assert all(type(m.weight) is torch.nn.Parameter for m in all_linears(model).values())
    # a refused plan leaves the model as it was, dtype included
    fp32 = pruned_model(dtype=torch.float32)
    report = plan(fp32, dtype=torch.float16, backend="cutlass")
    with torch.no_grad():
        fp32.get_submodule(name).weight.normal_()
    with pytest.raises(ValueError, match="changed since plan"):
        apply_plan(fp32, report)
    assert all(p.dtype == torch.float32 for p in fp32.parameters())


# ----------------------------------------------------------------------------- on an NVIDIA GPU

_NO_GPU = "needs an NVIDIA GPU with compute capability >= 8.0 (torch.cuda.is_available() is False)"
if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0):
    _NO_GPU = f"needs compute capability >= 8.0, this GPU has {torch.cuda.get_device_capability()}"
_HAS_GPU = (torch.cuda.is_available() and torch.version.hip is None
            and torch.cuda.get_device_capability() >= (8, 0))
gpu = pytest.mark.skipif(not _HAS_GPU, reason=_NO_GPU)


def _inputs(model, dtype, samples=2):
    rows = make_calibration_dataset(model, samples, seed=1)
    return [{k: v.to("cuda", dtype) if v.is_floating_point() else v.to("cuda") for k, v in row.items()}
            for row in rows]


@gpu
@pytest.mark.parametrize("family,dtype", [("llava", torch.float16), ("qwen2_vl", torch.bfloat16)])
def test_gpu_outputs_equal_dense_within_half_precision(family, dtype):
    from torch.sparse import SparseSemiStructuredTensor

    # hidden 128, intermediate 256: shapes every backend takes (CUTLASS needs multiples of 32x64)
    model = pruned_model(family, dtype=dtype, hidden_size=128, intermediate_size=256).to("cuda")
    inputs = _inputs(model, dtype)
    dense_weights = {n: m.weight.detach().clone() for n, m in language_linears(model).items()}
    with torch.no_grad():
        dense = [model(**x).logits.float() for x in inputs]
        reference = [model.float()(**{k: (v.float() if v.is_floating_point() else v) for k, v in x.items()})
                     .logits for x in inputs]
    model.to(dtype)

    report = to_semi_structured(model)
    assert report.applied and report.converted_share == 1.0 and len(report.converted) == 14
    for name, module in language_linears(model).items():
        assert isinstance(module.weight, SparseSemiStructuredTensor), name
        assert torch.equal(module.weight.to_dense(), dense_weights[name]), name
    for name in ("lm_head",):
        assert not isinstance(model.get_submodule(name).weight, SparseSemiStructuredTensor)

    with torch.no_grad():
        sparse = [model(**x).logits.float() for x in inputs]
    for d, s, r in zip(dense, sparse, reference):
        scale = r.abs().max()
        # the sparse kernels accumulate in another order: allow what the dense half-precision
        # model itself is off from float32, plus one part in a thousand of the logits' range
        assert (s - r).abs().max() <= 2 * (d - r).abs().max() + 1e-3 * scale
        torch.testing.assert_close(s, d, rtol=2e-2, atol=2e-2 * float(scale))


@gpu
def test_gpu_generation_runs_with_the_kv_cache():
    model = pruned_model("llava", hidden_size=128, intermediate_size=256).to("cuda")
    x = _inputs(model, torch.float16, samples=1)[0]
    with torch.no_grad():
        dense = model.generate(**x, max_new_tokens=4, do_sample=False)
    to_semi_structured(model)
    with torch.no_grad():
        sparse = model.generate(**x, max_new_tokens=4, do_sample=False)
    assert sparse.shape == dense.shape


@gpu
def test_gpu_dtype_argument_casts_the_model():
    model = pruned_model("llava", dtype=torch.float32, hidden_size=128, intermediate_size=256).to("cuda")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*prototype stage")  # silenced by apply_plan
        report = to_semi_structured(model, dtype=torch.float16)
    assert report.dtype == "float16"
    assert all(p.dtype == torch.float16 for p in model.parameters() if p.is_floating_point())
