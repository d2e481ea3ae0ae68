"""Community quantized checkpoints (issue #18): compressed-tensors written by its own library and by
edge-dlm, GPTQ in its documented layout; logits against the dequantized float model, lossless modes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_mode
from safetensors.torch import load_file, save_file

from edge_dlm import cli
from edge_dlm.primitives.attention import BLOCK
from edge_dlm.model.quant import QuantLinear
from edge_dlm.model.weights import load_model

PROMPT = [1, 40, 41, 42, 43]


def logits(model) -> torch.Tensor:
    x = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        return model(x, torch.arange(6)[None], mask=BLOCK.new_mask(6))


def float_model_with(src: Path, weights: dict[str, torch.Tensor]):
    """The full-precision model with these module weights replaced (the reference dequantization)."""
    m = load_model(src)
    for name, w in weights.items():
        m.get_submodule(name).weight.data = w.float()
    return m


def assert_lossless(model) -> None:
    ar, _ = run_mode(model, PROMPT, "ar", max_new_tokens=10)
    for mode in ("linear-spec", "quadratic-spec"):
        spec, _ = run_mode(model, PROMPT, mode, max_new_tokens=10)
        assert spec.output_ids == ar.output_ids, mode


# ---- compressed-tensors, written by the library -------------------------------------------------------

def reference_ct_checkpoint(src: Path, out: Path, bits: int, symmetric: bool, group_size: int) -> dict:
    """Quantize `src` with compressed-tensors itself (its qparams, its compressor, its config writer)."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    assert ct
    model = load_model(src, lora=False)
    strategy = {"strategy": "group", "group_size": group_size} if group_size else {"strategy": "channel"}
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, **strategy)
    qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                            ignore=["diffusion_head"], format="pack-quantized")
    apply_quantization_config(model, qc)
    for _, mod in model.named_modules():
        if hasattr(mod, "weight_scale"):
            w = mod.weight.data
            g = w.reshape(w.shape[0], -1, group_size) if group_size else w[:, None, :]
            scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
            mod.weight_scale.data.copy_(scale.reshape(mod.weight_scale.shape))
            if hasattr(mod, "weight_zero_point"):
                mod.weight_zero_point.data.copy_(zp.reshape(mod.weight_zero_point.shape))
    mc = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    mc.compress_model(model)
    shutil.copytree(src, out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    mc.update_config(str(out))
    return json.loads((out / "config.json").read_text())["quantization_config"]


def ct_decompressed(out: Path, qconfig: dict) -> dict[str, torch.Tensor]:
    """Every quantized module's weight as compressed-tensors' own decompressor computes it."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    scheme = QuantizationConfig.model_validate(qconfig).config_groups["group_0"]
    sd = load_file(out / "model.safetensors")
    modules = {k.rsplit(".", 1)[0] for k in sd if k.endswith(".weight_packed")}
    return {m: PackedQuantizationCompressor.decompress(
        {k.rsplit(".", 1)[1]: v for k, v in sd.items() if k.rsplit(".", 1)[0] == m}, scheme)["weight"]
        for m in modules}


@pytest.mark.parametrize("bits,symmetric,group_size", [(4, True, 32), (4, False, 32), (8, True, 0), (8, False, 64),
                                                       (4, True, 0)])
def test_compressed_tensors_checkpoints_load_exactly(tiny_ckpt, tmp_path, bits, symmetric, group_size):
    out = tmp_path / "ct"
    qconfig = reference_ct_checkpoint(tiny_ckpt, out, bits, symmetric, group_size)
    ours = load_model(out)
    quantized = {n for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    reference = ct_decompressed(out, qconfig)
    assert quantized == set(reference) and "diffusion_head" not in quantized and len(quantized) == 14
    for name in quantized:  # the very weights compressed-tensors decompresses to
        assert torch.equal(ours.get_submodule(name).dequantize(reference[name].dtype), reference[name]), name
    torch.testing.assert_close(logits(ours), logits(float_model_with(tiny_ckpt, reference)), atol=1e-5, rtol=0)
    assert ours.config.quantization["layout"] == "compressed-tensors"
    assert_lossless(ours)


def test_edge_dlm_writes_compressed_tensors_the_library_reads_bit_for_bit(tiny_ckpt, tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    for bits, gs, extra in ((4, 32, []), (8, 64, ["--keep-head"])):
        out = tmp_path / f"ct{bits}"
        assert cli.main(["export", str(tiny_ckpt), "-o", str(out), "--quant", f"int{bits}", "--group-size", str(gs),
                         "--format", "compressed-tensors", *extra]) == 0
        cfg = json.loads((out / "config.json").read_text())
        assert "quantization" not in cfg and cfg["quantization_config"]["quant_method"] == "compressed-tensors"
        QuantizationConfig.model_validate(cfg["quantization_config"])  # the library accepts the config
        reference = ct_decompressed(out, cfg["quantization_config"])
        ours = load_model(out)
        for name, w in reference.items():
            assert torch.equal(ours.get_submodule(name).dequantize(w.dtype), w), name
        assert ("diffusion_head" in reference) == (not extra)
        assert cfg["quantization_config"]["ignore"] == (["diffusion_head"] if extra else [])
        assert not isinstance(ours.encoder.embed_tokens, QuantLinear)  # compressed-tensors quantizes Linear only
        torch.testing.assert_close(logits(ours), logits(float_model_with(tiny_ckpt, reference)), atol=1e-5, rtol=0)
        assert (out / "linear_spec_lora" / "adapter_config.json").exists()
        assert_lossless(ours)
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(tmp_path / "ct4"), "--prompt", "hi", "--mode", "linear-spec",
                     "--max-new-tokens", "4", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "linear-spec"


@pytest.mark.parametrize("args,needle", [
    (["--asymmetric"], "compressed-tensors stores integer zero points"),
    (["--quant", "nf4"], "takes --quant int4 or int8"),
    (["--target", "onnx"], "use it with --target torch"),
])
def test_bad_compressed_tensors_exports_are_one_line(tiny_ckpt, tmp_path, capsys, args, needle):
    argv = ["export", str(tiny_ckpt), "-o", str(tmp_path / "x"), "--format", "compressed-tensors"]
    argv += args if "--quant" in args else ["--quant", "int4", *args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not (tmp_path / "x").exists()


# ---- GPTQ, in its documented layout ---------------------------------------------------------------

def gptq_pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's packing: 32/bits unsigned values per int32 down the rows, value j at bit j*bits."""
    per = 32 // bits
    q = q.to(torch.int64)
    out = torch.zeros(q.shape[0] // per, q.shape[1], dtype=torch.int64)
    for j in range(per):
        out |= q[j::per] << (bits * j)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def gptq_checkpoint(src: Path, out: Path, bits: int, group: int, desc_act: bool, v2: bool, sym: bool,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Quantize every layer linear GPTQ-style (RTN stands in for the Hessian search: the layout is what is
    tested), write qweight/qzeros/scales/g_idx; returns the dequantized weight per module."""
    gen = torch.Generator().manual_seed(seed)
    model = load_model(src, lora=False)
    tensors = {k: v for k, v in model.state_dict().items()}
    maxq = 2**bits - 1
    dequant = {}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or name == "diffusion_head":
            continue
        w = m.weight.data.T.contiguous()  # [in, out]
        n_in, n_out = w.shape
        n_groups = n_in // group
        g_idx = torch.arange(n_in) // group
        if desc_act:  # act-order: a column permutation decides the groups
            g_idx = g_idx[torch.randperm(n_in, generator=gen)]
        scales = torch.zeros(n_groups, n_out)
        zeros = torch.zeros(n_groups, n_out, dtype=torch.int64)
        for g in range(n_groups):
            cols = w[g_idx == g]
            lo, hi = cols.amin(0).clamp(max=0), cols.amax(0).clamp(min=0)
            if sym:
                s = torch.maximum(lo.abs(), hi) * 2 / maxq
                z = torch.full((n_out,), (maxq + 1) // 2)
            else:
                s = (hi - lo) / maxq
                z = torch.round(-lo / s.clamp_min(1e-9))
            scales[g], zeros[g] = s.clamp_min(1e-9), z.long()
        scales = scales.half()
        q = torch.clamp(torch.round(w / scales.float()[g_idx] + zeros[g_idx]), 0, maxq).long()
        dequant[name] = (scales[g_idx] * (q - zeros[g_idx]).half()).T.contiguous()
        stored_zeros = zeros - (0 if v2 else 1)
        del tensors[f"{name}.weight"]
        tensors[f"{name}.qweight"] = gptq_pack_rows(q, bits)
        tensors[f"{name}.qzeros"] = gptq_pack_rows(stored_zeros.T.contiguous(), bits).T.contiguous()
        tensors[f"{name}.scales"] = scales
        tensors[f"{name}.g_idx"] = g_idx.to(torch.int32)
    shutil.copytree(src, out)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act,
                                  "sym": sym, "checkpoint_format": "gptq_v2" if v2 else "gptq",
                                  "lm_head": False, "true_sequential": True}
    (out / "config.json").write_text(json.dumps(cfg))
    return dequant


@pytest.mark.parametrize("bits,group,desc_act,v2,sym", [(4, 32, False, False, True), (4, 32, True, False, False),
                                                        (8, 64, True, True, True), (4, 64, False, True, False)])
def test_gptq_checkpoints_load_exactly(tiny_ckpt, tmp_path, bits, group, desc_act, v2, sym):
    out = tmp_path / "gptq"
    reference = gptq_checkpoint(tiny_ckpt, out, bits, group, desc_act, v2, sym)
    ours = load_model(out)
    for name, w in reference.items():
        lin = ours.get_submodule(name)
        assert isinstance(lin, QuantLinear) and (lin.perm is not None) == (desc_act and lin.in_features > group)
        assert torch.equal(lin.weight_in_input_order(torch.float16), w), name
    torch.testing.assert_close(logits(ours), logits(float_model_with(tiny_ckpt, reference)), atol=1e-5, rtol=0)
    assert_lossless(ours)


# ---- what is refused --------------------------------------------------------------------------------

def with_config(tiny_ckpt: Path, tmp_path: Path, qconfig: dict) -> Path:
    d = tmp_path / "q"
    shutil.copytree(tiny_ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = qconfig
    (d / "config.json").write_text(json.dumps(cfg))
    return d


W4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}


@pytest.mark.parametrize("qconfig,needle", [
    ({"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {**W4, "num_bits": 8}, "input_activations": {"num_bits": 8}}}},
     "quantizes activations"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {**W4, "type": "float", "num_bits": 8}}}}, "not supported"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {**W4, "actorder": "group"}}}}, "act-order"),
    ({"quant_method": "awq", "bits": 4}, "quant_method 'awq' is not supported"),
    ({"quant_method": "gptq", "bits": 3}, "GPTQ with 3 bits"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "marlin"}, "checkpoint_format"),
])
def test_unsupported_quantization_is_one_line(tiny_ckpt, tmp_path, capsys, qconfig, needle):
    d = with_config(tiny_ckpt, tmp_path, qconfig)
    assert cli.main(["generate", "--model", str(d), "--prompt", "hi", "--mode", "ar", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_transformers_loader_reads_the_export_bit_for_bit(tiny_ckpt, tmp_path, capsys):
    """transformers' compressed-tensors loader on edge-dlm's export. NLD itself is remote code in
    transformers (never run here), so the export is renamed onto Ministral3, the same layer math that
    `edge_dlm.model.reference` uses: only names change, the packed tensors and quantization_config are the export's."""
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    from edge_dlm.model.config import NLDConfig

    out, hf = tmp_path / "ct", tmp_path / "hf"
    assert cli.main(["export", str(tiny_ckpt), "-o", str(out), "--quant", "int4", "--group-size", "32",
                     "--format", "compressed-tensors"]) == 0
    capsys.readouterr()
    cfg = NLDConfig.from_file(out / "config.json")

    def rename(k: str) -> str:
        if k.startswith("diffusion_head"):
            return "lm_head" + k[len("diffusion_head"):]
        return k.replace("encoder.", "model.", 1)

    hc = transformers.Ministral3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=False,
        rope_parameters={k: v for k, v in cfg.to_dict()["rope_parameters"].items() if k != "truncate"})
    hf.mkdir()
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    (hf / "config.json").write_text(json.dumps({**hc.to_dict(), "architectures": ["Ministral3ForCausalLM"],
                                                "quantization_config": qconfig}))
    save_file({rename(k): v for k, v in load_file(out / "model.safetensors").items()}, str(hf / "model.safetensors"))
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf, dtype=torch.float16, quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    ours = load_model(out)
    quantized = [n for n, m in ours.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 15
    for name in quantized:
        assert torch.equal(model.get_submodule(rename(name)).weight, ours.get_submodule(name).dequantize(torch.float16))
