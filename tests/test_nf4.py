"""The NF4 weight container: fields vs the oracle, memory figures, bitsandbytes state-dict round trips, bad inputs."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qlora
from hyp import examples
from qlora import bnb_format
from qlora.nf4 import NF4Weight, quantize_nf4
from qlora.reference import codebook as ref_codebook
from qlora.reference import quantize as ref_quantize

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
SPEC_KEYS_NESTED = {"", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                    ".quant_state.bitsandbytes__nf4"}


def _weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)


def _fields_equal(a: NF4Weight, b: NF4Weight) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype and a.blocksize == b.blocksize
    assert a.nested_blocksize == b.nested_blocksize and a.offset == b.offset
    for name in ("packed", "absmax", "code", "absmax2", "nested_code"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name


shapes = st.lists(st.integers(1, 48), min_size=1, max_size=3).map(tuple)


@examples(15)
@given(shape=shapes, blocksize=st.sampled_from(BLOCKSIZES), double_quant=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_quantize_nf4_matches_oracle(shape, blocksize, double_quant, dtype, seed):
    w = _weight(shape, dtype, seed)
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    # bf16 and fp16 convert to float32 exactly, so the oracle sees the very values the kernel saw.
    x = w.float().numpy()
    code = ref_codebook.normal_float_codebook(4)
    packed, absmax = ref_quantize.quantize_4bit(x, code, blocksize)
    assert q.shape == torch.Size(shape) and q.dtype == dtype and q.double_quant == double_quant
    np.testing.assert_array_equal(q.packed.numpy(), packed)
    np.testing.assert_array_equal(q.code.numpy(), code)
    if double_quant:
        qabsmax, absmax2, offset = ref_quantize.double_quantize(absmax, 256)
        np.testing.assert_array_equal(q.absmax.numpy(), qabsmax)
        np.testing.assert_array_equal(q.absmax2.numpy(), absmax2)
        assert q.offset == float(offset)
        np.testing.assert_array_equal(q.nested_code.numpy(), ref_codebook.dynamic_map(signed=True))
        scales = ref_quantize.double_dequantize(qabsmax, absmax2, offset, 256)
    else:
        np.testing.assert_array_equal(q.absmax.numpy(), absmax)
        scales = absmax
    # Dequantization is exact in float32 (one multiply), then a single rounding to the output dtype.
    expected = ref_quantize.dequantize_4bit(packed, scales, code, shape, blocksize)
    assert torch.equal(q.dequantize(torch.float32), torch.from_numpy(expected))
    assert torch.equal(q.dequantize(), torch.from_numpy(expected).to(dtype))


def test_memory_figures_match_spec():
    w = _weight((1024, 1024), torch.bfloat16, 0)
    plain = quantize_nf4(w, blocksize=64, double_quant=False)
    nested = quantize_nf4(w, blocksize=64, double_quant=True)
    # SPEC 3: 32/64 = 0.5 bits of scale per parameter without double quantization,
    # 8/64 + 32/(64*256) = 0.127 with it; the codes themselves are 4 bits.
    assert plain.bits_per_param == pytest.approx(4.5, abs=1e-12)
    assert nested.bits_per_param == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-12)
    assert nested.nbytes == 1024 * 1024 // 2 + 16384 + 64 * 4 + 16 * 4 + 256 * 4


def test_round_trip_error_matches_spec_figure():
    # SPEC 8: randn 1024x1024 at blocksize 64, NF4 mean absolute round-trip error 0.0728; 0.0729 with double quant.
    w = _weight((1024, 1024), torch.float32, 1)
    for double_quant, expected in ((False, 0.0728), (True, 0.0729)):
        err = (quantize_nf4(w, 64, double_quant).dequantize() - w).abs().mean().item()
        assert abs(err - expected) < 5e-4, (double_quant, err)


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip_is_lossless(double_quant):
    w = quantize_nf4(_weight((6, 35), torch.bfloat16, 2), blocksize=32, double_quant=double_quant)
    prefix = "model.layers.0.mlp.up_proj.weight"
    sd = w.to_bnb_state_dict(prefix)
    expected_keys = SPEC_KEYS_NESTED if double_quant else {"", ".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4"}
    assert set(sd) == {prefix + k for k in expected_keys}
    assert sd[prefix].dtype == torch.uint8 and tuple(sd[prefix].shape) == ((6 * 35 + 1) // 2, 1)
    assert sd[prefix + ".quant_map"].dtype == torch.float32 and sd[prefix + ".quant_map"].shape == (16,)
    if double_quant:
        assert sd[prefix + ".absmax"].dtype == torch.uint8
        assert sd[prefix + ".nested_quant_map"].shape == (256,)
    else:
        assert sd[prefix + ".absmax"].dtype == torch.float32
    back = NF4Weight.from_bnb_state_dict(sd, prefix)
    _fields_equal(w, back)
    assert torch.equal(back.dequantize(), w.dequantize())


def test_quant_state_json_is_what_bitsandbytes_writes():
    w = quantize_nf4(_weight((4, 8), torch.bfloat16, 3), blocksize=64, double_quant=True)
    raw = bytes(w.to_bnb_state_dict("w")["w.quant_state.bitsandbytes__nf4"].tolist())
    # bitsandbytes' QuantState.as_dict(packed=True) dumps the non-tensor items with json.dumps' default separators,
    # in this order; the offset is the float32 mean as a Python float.
    expected = ('{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4, 8], '
                f'"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": {w.offset!r}}}')
    assert raw.decode("utf-8") == expected
    assert np.float32(w.offset) == w.offset  # exactly a float32 value, so JSON round-trips it exactly
    assert json.loads(raw)["nested_offset"] == w.offset


def test_packed_bytes_in_float_quant_storage_load():
    # bitsandbytes' quant_storage (used for FSDP) keeps the same bytes viewed as another dtype.
    w = quantize_nf4(_weight((8, 16), torch.float16, 4), blocksize=64)
    sd = w.to_bnb_state_dict("p")
    sd["p"] = sd["p"].reshape(-1).view(torch.bfloat16).reshape(-1, 1)
    _fields_equal(w, NF4Weight.from_bnb_state_dict(sd, "p"))


def test_to_same_device_and_fields_are_validated():
    w = quantize_nf4(_weight((3, 5), torch.float32, 5), blocksize=32, double_quant=False)
    assert w.to("cpu") is w
    with pytest.raises(ValueError, match="packed must be uint8"):
        NF4Weight(packed=w.packed[:-1], absmax=w.absmax, code=w.code, blocksize=32, shape=w.shape, dtype=w.dtype)
    with pytest.raises(ValueError, match="absmax must be"):
        NF4Weight(packed=w.packed, absmax=w.absmax.repeat(2), code=w.code, blocksize=32, shape=w.shape,
                  dtype=w.dtype)
    with pytest.raises(ValueError, match="given together"):
        NF4Weight(packed=w.packed, absmax=w.absmax, code=w.code, blocksize=32, shape=w.shape, dtype=w.dtype,
                  offset=0.5)


@pytest.mark.parametrize("missing", sorted(SPEC_KEYS_NESTED))
def test_truncated_state_dict_names_the_missing_key(missing):
    sd = quantize_nf4(_weight((4, 16), torch.bfloat16, 6), blocksize=32).to_bnb_state_dict("layer.weight")
    del sd["layer.weight" + missing]
    if missing == ".quant_state.bitsandbytes__nf4":
        match = "quant_state"
    else:
        match = "layer.weight" + missing.replace(".", r"\.")
    with pytest.raises(KeyError, match=match):
        NF4Weight.from_bnb_state_dict(sd, "layer.weight")


def _with_meta(sd, key, **changes):
    meta = json.loads(bytes(sd[key].tolist()))
    meta.update(changes)
    for k, v in list(meta.items()):
        if v is None:
            del meta[k]
    sd[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return sd


@pytest.mark.parametrize("changes, match", [
    (dict(quant_type="fp4"), "only 'nf4'"),
    (dict(blocksize=48), "JSON field 'blocksize' of 'w.quant_state.bitsandbytes__nf4' must be one of"),
    (dict(dtype="float64"), "'dtype'"),
    (dict(shape=[4, 15]), "state dict entry 'w' must be uint8 of shape \\(30,\\) for shape \\(4, 15\\)"),
    (dict(shape=[4, -16]), "'shape'"),
    (dict(nested_offset=None), "lacks the JSON field"),
    (dict(nested_dtype="float16"), "nested_dtype"),
    (dict(blocksize=None), "lacks the JSON field 'blocksize'"),
])
def test_malformed_quant_state_is_refused(changes, match):
    key = "w.quant_state.bitsandbytes__nf4"
    sd = quantize_nf4(_weight((4, 16), torch.bfloat16, 7), blocksize=32).to_bnb_state_dict("w")
    with pytest.raises(ValueError, match=match):
        NF4Weight.from_bnb_state_dict(_with_meta(sd, key, **changes), "w")


def test_garbage_json_and_wrong_tensors_are_refused():
    sd = quantize_nf4(_weight((4, 16), torch.bfloat16, 8), blocksize=32).to_bnb_state_dict("w")
    bad = dict(sd)
    bad["w.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="not valid UTF-8 JSON"):
        NF4Weight.from_bnb_state_dict(bad, "w")
    bad = dict(sd)
    bad["w.absmax"] = sd["w.absmax"][:-1]
    with pytest.raises(ValueError, match="state dict entry 'w.absmax' must be torch.uint8 of shape"):
        NF4Weight.from_bnb_state_dict(bad, "w")
    bad = dict(sd)
    bad["w.quant_map"] = sd["w.quant_map"].double()
    with pytest.raises(ValueError, match="state dict entry 'w.quant_map' must be float32 of shape"):
        NF4Weight.from_bnb_state_dict(bad, "w")
    with pytest.raises(ValueError, match="prefix"):
        NF4Weight.from_bnb_state_dict(sd, "")


def test_quantize_nf4_rejects_bad_inputs():
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        quantize_nf4(np.zeros((4, 4), np.float32))
    with pytest.raises(TypeError, match="weight must be float32, float16 or bfloat16"):
        quantize_nf4(torch.zeros(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.zeros(4, 4), blocksize=48)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_nf4(torch.tensor([[1.0, math.nan]]))
    with pytest.raises(TypeError, match="dtype must be one of"):
        quantize_nf4(torch.ones(4, 4)).dequantize(torch.int8)


def test_public_namespace():
    assert qlora.quantize_nf4 is quantize_nf4 and qlora.NF4Weight is NF4Weight


# A checkpoint written by bitsandbytes 0.50.2 itself (tests/data/make_bnb_checkpoint.py), the independent check
# that "bit-exact with bitsandbytes" means what it says.
_BNB = torch.load(__file__.replace("test_nf4.py", "data/bnb_nf4_checkpoint.pt"), weights_only=True)


@pytest.mark.parametrize("name", sorted(_BNB["dense"]))
def test_bitsandbytes_checkpoint_loads_and_saves_back_identically(name):
    sd = _BNB["state_dict"]
    w = NF4Weight.from_bnb_state_dict(sd, name)
    # Dequantization of bitsandbytes' own bytes gives bitsandbytes' own dequantized weight, bit for bit.
    assert torch.equal(w.dequantize(), _BNB["bnb_dequantized"][name])
    # Saving writes back exactly the entries bitsandbytes wrote, JSON bytes included.
    ours = w.to_bnb_state_dict(name)
    theirs = {k: v for k, v in sd.items() if k == name or k.startswith(name + ".")}
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("name", sorted(_BNB["dense"]))
def test_quantizing_reproduces_bitsandbytes_codes(name):
    dense = _BNB["dense"][name]
    theirs = NF4Weight.from_bnb_state_dict(_BNB["state_dict"], name)
    ours = quantize_nf4(dense, blocksize=theirs.blocksize, double_quant=theirs.double_quant)
    assert torch.equal(ours.packed, theirs.packed)
    assert torch.equal(ours.code, theirs.code)
    if theirs.double_quant:
        assert torch.equal(ours.nested_code, theirs.nested_code)
    else:
        assert torch.equal(ours.absmax, theirs.absmax)


# --------------------------------------------------------------------------------------------------------------
# qlora.bnb_format: keys, codec, and one validation whose messages name the field, the key or the JSON field
# --------------------------------------------------------------------------------------------------------------

def test_keys_and_codec_are_those_the_container_writes():
    for double_quant in (True, False):
        w = quantize_nf4(_weight((4, 16), torch.float16, 20), blocksize=32, double_quant=double_quant)
        sd = w.to_bnb_state_dict("m.weight")
        assert bnb_format.nf4_keys("m.weight", double_quant) == list(sd)
        state_key = bnb_format.quant_state_key("m.weight")
        assert state_key == "m.weight.quant_state.bitsandbytes__nf4" and bnb_format.is_quant_state_key(state_key)
        assert not bnb_format.is_quant_state_key("m.weight.absmax")
        meta = bnb_format.decode_quant_state(sd[state_key], state_key)
        assert (meta["blocksize"], meta["dtype"], meta["shape"]) == (32, "float16", [4, 16])
        assert ("nested_offset" in meta) == double_quant and meta.get("nested_offset") == w.offset
        nested = (w.nested_blocksize, w.offset) if double_quant else None
        assert torch.equal(bnb_format.encode_quant_state(32, torch.float16, (4, 16), nested), sd[state_key])


def _refusal(fn) -> str:
    with pytest.raises((TypeError, ValueError)) as err:
        fn()
    return str(err.value)


def _loaded(sd: dict, key: str, value) -> dict:
    return {**sd, key: value}


@pytest.mark.parametrize("field, key, change", [
    ("absmax", "w.absmax", lambda w: w.absmax[:-1]),
    ("code", "w.quant_map", lambda w: w.code.double()),
    ("absmax2", "w.nested_absmax", lambda w: torch.cat([w.absmax2, w.absmax2])),
    ("nested_code", "w.nested_quant_map", lambda w: w.nested_code[:128]),
])
def test_a_broken_rule_reads_the_same_from_the_constructor_and_from_a_state_dict(field, key, change):
    w = quantize_nf4(_weight((4, 16), torch.bfloat16, 21), blocksize=32)
    bad = change(w)
    direct = _refusal(lambda: dataclasses.replace(w, **{field: bad}))
    loaded = _refusal(lambda: NF4Weight.from_bnb_state_dict(_loaded(w.to_bnb_state_dict("w"), key, bad), "w"))
    assert direct.startswith(f"{field} must be ")
    assert loaded == direct.replace(field, f"state dict entry {key!r}", 1)


def test_values_are_checked_on_load_and_on_request_naming_the_field():
    w = quantize_nf4(_weight((4, 16), torch.float32, 22), blocksize=32)
    flipped = w.code.flip(0)
    bad = dataclasses.replace(w, code=flipped)  # structure is fine: construction does not read the values
    fields = {f.name: getattr(bad, f.name) for f in dataclasses.fields(bad)}
    direct = _refusal(lambda: bnb_format.check_nf4(**fields, values=True))
    assert direct.startswith("code must be the NF4 codebook (only NF4 is supported); entry 0 is 1.0")
    loaded = _refusal(lambda: NF4Weight.from_bnb_state_dict(bad.to_bnb_state_dict("w"), "w"))
    assert loaded == direct.replace("code", "state dict entry 'w.quant_map'", 1)
    plain = quantize_nf4(_weight((4, 16), torch.float32, 23), blocksize=32, double_quant=False)
    negative = plain.absmax.clone()
    negative[1] = -0.5
    fields = {f.name: getattr(plain, f.name) for f in dataclasses.fields(plain)}
    assert _refusal(lambda: bnb_format.check_nf4(**{**fields, "absmax": negative}, values=True)) == (
        "absmax must hold finite block scales >= 0; entry 1 is -0.5")
    bnb_format.check_nf4(**fields, values=True)  # a quantizer's weight passes


def test_offset_and_blocksize_rules_name_the_json_field_on_load():
    w = quantize_nf4(_weight((4, 16), torch.bfloat16, 24), blocksize=32)
    state_key = "w.quant_state.bitsandbytes__nf4"
    direct = _refusal(lambda: dataclasses.replace(w, offset=0.1))
    loaded = _refusal(lambda: NF4Weight.from_bnb_state_dict(
        _with_meta(w.to_bnb_state_dict("w"), state_key, nested_offset=0.1), "w"))
    assert loaded == direct.replace("offset", f"JSON field 'nested_offset' of {state_key!r}", 1)
    assert _refusal(lambda: dataclasses.replace(w, blocksize=48)).startswith("blocksize must be one of (32, 64")
    with pytest.raises(ValueError, match=r"but the weight must have shape \[16, 4\]"):
        NF4Weight.from_bnb_state_dict(w.to_bnb_state_dict("w"), "w", shape=(16, 4))


def test_code_table_check_for_sharded_loads():
    table = quantize_nf4(_weight((4, 16), torch.float32, 25)).nested_code
    bnb_format.check_code_table("x", table, 256)
    broken = table.clone()
    broken[9] = 0.0
    with pytest.raises(ValueError, match=r"^x must be the signed dynamic map \(only NF4 is supported\); entry 9 is 0.0"):
        bnb_format.check_code_table("x", broken, 256)
    with pytest.raises(ValueError, match=r"^x must be float32 of shape \(16,\)"):
        bnb_format.check_code_table("x", table, 16)


def test_kernels_import_nothing_from_the_layer_above():
    """kernels/ is the low-level layer (plain tensors in, plain tensors out): no import of qlora outside it."""
    root = Path(qlora.kernels.__file__).parent
    for path in root.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        bad = re.findall(r"^\s*(?:from\s+(?:qlora(?!\.kernels)\S*|\.\.\S*)\s+import|import\s+qlora(?!\.kernels))",
                         text, re.M)
        assert not bad, (path.name, bad)


@pytest.mark.parametrize("double_quant", [False, True])
def test_kernel_kwargs_are_the_launchers_weight_arguments(double_quant):
    """``NF4Weight.kernel_kwargs`` names exactly the weight parameters of the layer's kernel launchers, and a forward
    with zero LoRA factors through them gives x @ W^T with W the container's own dequantized weight (float32, one
    K block per row: every product exact to float32 rounding of the sum, bounded by K * eps * sum |x w|)."""
    import inspect

    from qlora.kernels import linear as K

    gen = torch.Generator().manual_seed(3)
    weight = quantize_nf4(torch.randn(48, 64, generator=gen), blocksize=64, double_quant=double_quant)
    kwargs = weight.kernel_kwargs()
    for launcher in (K.nf4_lora_forward, K.nf4_lora_backward):
        params = inspect.signature(launcher).parameters
        assert set(kwargs) <= set(params), set(kwargs) - set(params)
    assert set(inspect.signature(K.nf4_lora_forward).parameters) - set(kwargs) == {
        "x", "lora_a", "lora_b", "scaling", "bias", "dropout_p", "seed", "keep", "config"}
    x = torch.randn(5, 64, generator=gen)
    y, _ = K.nf4_lora_forward(x, lora_a=torch.zeros(4, 64), lora_b=torch.zeros(48, 4), scaling=1.0, **kwargs)
    w = weight.dequantize(torch.float32).double()
    want = x.double() @ w.T
    bound = 64 * torch.finfo(torch.float32).eps * (x.double().abs() @ w.abs().T)
    assert torch.all((y.double() - want).abs() <= bound)
