"""GGUF transformer weights (infinitystar/gguf.py): our torch dequantizers against the gguf package's reference
ones (llama.cpp's formats), convert -> load round trips through real files, and the errors for files we cannot use.
"""
import struct
from unittest import mock

import numpy as np
import pytest
import torch

gguf_pkg = pytest.importorskip("gguf", reason="pip install gguf (requirements.txt) to test GGUF weights")

from infinitystar import gguf  # noqa: E402
from infinitystar.checkpoint import CheckpointReader, load_transformer  # noqa: E402
from infinitystar.cli import main  # noqa: E402
from infinitystar.sampler import TextCondition, sample  # noqa: E402
from infinitystar.schedule import build_schedule  # noqa: E402

Q = gguf_pkg.GGMLQuantizationType
ROWS, COLS = 6, 512  # 2 K-quant super-blocks, 16 small blocks a row


def _random_blocks(qtype, rng):
    """Valid random bytes of qtype: from the reference quantizer where it has one, else random bytes whose fp16
    scale fields are finite."""
    block, size = gguf_pkg.GGML_QUANT_SIZES[qtype]
    data = rng.standard_normal((ROWS, COLS)).astype(np.float32) * rng.uniform(0.01, 2, (ROWS, 1)).astype(np.float32)
    try:
        return gguf_pkg.quants.quantize(data, qtype)
    except NotImplementedError:
        pass
    raw = rng.integers(0, 256, (ROWS * COLS // block, size), dtype=np.uint8)
    halves = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]
    for at in halves:
        raw[:, at:at + 2] = rng.uniform(-0.1, 0.1, raw.shape[0]).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(ROWS, -1)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"])
def test_dequantize_equals_the_reference(name):
    qtype = Q[name]
    raw = _random_blocks(qtype, np.random.default_rng(int(qtype)))
    want = gguf_pkg.quants.dequantize(raw, qtype).astype(np.float32)
    assert want.shape == (ROWS, COLS) and np.isfinite(want).all() and np.abs(want).max() > 0
    got = gguf.dequantize(torch.from_numpy(np.ascontiguousarray(raw)).view(torch.uint8), int(qtype), (ROWS, COLS))
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-6, atol=0)
    assert gguf.stored_bytes((ROWS, COLS), int(qtype)) == raw.nbytes
    half = gguf.dequantize(torch.from_numpy(np.ascontiguousarray(raw)), int(qtype), (ROWS, COLS), torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, got.to(torch.bfloat16))  # one rounding, at the end


@pytest.mark.parametrize("name, bound", [("Q8_0", 0.007), ("Q6_K", 0.025), ("Q5_K", 0.045), ("Q4_K", 0.09)])
def test_our_quantizers_are_read_right_by_the_reference(name, bound):
    """quantize's bytes, read by the gguf package's reference dequantizer: close to the weight (so the layout is
    the format's), and equal to what our dequantizer reads."""
    w = torch.randn(8, 1024, generator=torch.Generator().manual_seed(5)) * 0.02
    w[0, :256] = 0  # an all-zero super-block must not divide by zero
    raw = gguf.quantize(w, name)
    qtype = Q[name]
    block, size = gguf_pkg.GGML_QUANT_SIZES[qtype]
    assert raw.dtype == torch.uint8 and raw.shape == (8, 1024 // block * size)
    ref = torch.from_numpy(gguf_pkg.quants.dequantize(raw.numpy(), qtype).astype(np.float32))
    err = ((ref - w).norm() / w.norm()).item()
    assert 0 < err <= bound, err
    assert torch.equal(ref[0, :256], torch.zeros(256))
    torch.testing.assert_close(gguf.dequantize(raw, int(qtype), tuple(w.shape)), ref, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="multiple of (256|32)"):
        gguf.quantize(w[:, :100], name)


def test_dequantize_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="not supported"):
        gguf.dequantize(torch.zeros(16, dtype=torch.uint8), 16, (1, 32))  # IQ2_XXS
    with pytest.raises(ValueError, match="does not hold"):
        gguf.dequantize(torch.zeros(34, dtype=torch.uint8), int(Q.Q8_0), (2, 32))


def test_gguf_linear_is_the_linear_of_the_dequantized_weight():
    raw = torch.from_numpy(_random_blocks(Q.Q5_K, np.random.default_rng(1)))
    layer = gguf.GGUFLinear(COLS, ROWS, bias=True)
    layer.weight = torch.nn.Parameter(raw, requires_grad=False)
    layer.gguf_type = int(Q.Q5_K)
    x = torch.randn(3, COLS, dtype=torch.bfloat16)
    w = gguf.dequantize(raw, int(Q.Q5_K), (ROWS, COLS), torch.bfloat16)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, w, layer.bias.to(torch.bfloat16)))


@pytest.mark.parametrize("name", ["Q8_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantizing_workspace_is_what_the_memory_estimate_counts(name, dtype):
    """Peak bytes of a GGUF layer's call beyond its result: at most the per-value workspace the estimate adds
    (less the raw copy a weight in system RAM needs, not made here), and a real fp32 copy (not a free lunch)."""
    from infinitystar.config import TRANSFORMER_PRESETS
    from infinitystar.memory import measure_peak_bytes, step_activation_bytes

    qtype = Q[name]
    block, size = gguf_pkg.GGML_QUANT_SIZES[qtype]
    rows, cols = 256, 1024
    layer = gguf.GGUFLinear(cols, rows, bias=False)
    layer.weight = torch.nn.Parameter(torch.randint(0, 256, (rows, cols // block * size), dtype=torch.uint8),
                                      requires_grad=False)
    layer.gguf_type = int(qtype)
    x = torch.randn(1, cols, dtype=dtype)
    _, peak = measure_peak_bytes(lambda: layer(x))
    n, b = rows * cols, dtype.itemsize
    assert peak - b * n <= (gguf.WORKSPACE_BYTES_PER_VALUE - 1) * n, peak / n
    assert peak >= 0.95 * (4 + (b if b < 4 else 0)) * n, peak / n  # the fp32 values, then the result beside them
    cfg = TRANSFORMER_PRESETS["tiny"]
    args = (cfg, 64, 64, 8, 2, dtype)
    extra = step_activation_bytes(*args, weight_dtype=torch.uint8) - step_activation_bytes(*args)
    assert extra == cfg.mlp_hidden * cfg.width * (b + gguf.WORKSPACE_BYTES_PER_VALUE)  # the largest weight's


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    src = tiny_models["transformer_720p"]
    return src, {q: gguf.convert(src, out / f"tiny_{q}.gguf", q) for q in ("Q8_0", "Q4_0", "F16", "Q4_K")}


def _written_type(qtype, shape):
    """What convert writes for a block weight: K-quants need rows of 256 values, else Q8_0."""
    return gguf.K_FALLBACK if qtype.endswith("_K") and shape[-1] % 256 else qtype


def test_convert_quantizes_the_block_weights_only(converted):
    src, files = converted
    official = CheckpointReader(src)
    for qtype, path in files.items():
        reader = gguf_pkg.GGUFReader(path)
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert set(types) == set(official.entries)
        for key, entry in official.entries.items():
            block = key.startswith("block_chunks.") and key.endswith("_proj.weight")
            assert types[key] == (_written_type(qtype, entry.shape) if block else "F32"), key
        if qtype == "Q4_K":  # the tiny model's down projections have rows of 256: really K-quantized
            assert {types[k] for k in types if k.endswith("down_proj.weight")} == {"Q4_K"}
        variant = reader.fields["infinitystar.variant"].contents()
        assert variant == "720p"
        assert [int(d) for d in reversed(next(t for t in reader.tensors if t.name == key).shape.tolist())] == \
            list(official.entries[key].shape)


def test_a_one_chunk_checkpoint_loads_and_converts(tmp_path):
    """The official layout of a one-chunk model (``blocks.{i}``, see test_transformer): the file loads as one chunk
    with its own weights, and convert quantizes its block weights as it does chunked ones."""
    import re

    from safetensors.torch import save_file

    from infinitystar.tiny import tiny_transformer_state_dict

    sd = {re.sub(r"^block_chunks\.(\d+)\.module\.0\.", r"blocks.\1.", k): v
          for k, v in tiny_transformer_state_dict(seed=2).items()}
    save_file(sd, str(tmp_path / "one_chunk.safetensors"))
    model, info = load_transformer(tmp_path / "one_chunk.safetensors")
    assert model.config.block_chunks == 1 and len(model.blocks) == 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    out = gguf.convert(tmp_path / "one_chunk.safetensors", tmp_path / "one_chunk.gguf", "Q8_0", variant="720p")
    types = {t.name: t.tensor_type.name for t in gguf_pkg.GGUFReader(out).tensors}
    assert {types[k] for k in sd if k.startswith("blocks.") and k.endswith("_proj.weight")} == {"Q8_0"}
    assert {types[k] for k in sd if not k.startswith("blocks.")} == {"F32"}
    quantized, _ = load_transformer(out)
    assert quantized.config == model.config


def test_a_converted_file_loads_with_the_official_weights_dequantized(converted):
    src, files = converted
    ref, _ = load_transformer(src)
    ref_state = ref.state_dict()
    for qtype, path in files.items():
        model, info = load_transformer(path)
        assert info.variant == "720p" and qtype in info.quant.split("+") and info.storage == f"GGUF {info.quant}"
        tol = {"Q8_0": 0.01, "Q4_0": 0.2, "F16": 1e-3, "Q4_K": 0.2}[qtype]  # relative error of a weight matrix
        for name, module in model.named_modules():
            if not isinstance(module, gguf.GGUFLinear):
                continue
            want = ref_state[f"{name}.weight"].float()
            if module.gguf_type is None:  # F32 / F16 tensors come as floats
                got = module.weight.float()
            else:
                got = gguf.dequantize(module.weight, module.gguf_type, tuple(want.shape))
            err = (got - want).norm() / want.norm()
            assert err <= tol, (qtype, name, err)
            if name.startswith("block_chunks.") and qtype != "F16":
                written = _written_type(qtype, tuple(want.shape))
                assert module.weight.dtype == torch.uint8 and module.gguf_type == int(Q[written])
                assert err > 0  # really quantized
            elif not name.startswith("block_chunks."):
                assert module.gguf_type is None and torch.equal(got, want)  # heads and embeddings: F32, exact


def test_sampling_from_gguf_equals_sampling_from_its_dequantized_weights(converted):
    """The on-the-fly path is exact: the same bits as a plain model holding the dequantized weights."""
    _, files = converted
    model, _ = load_transformer(files["Q4_0"])
    plain, _ = load_transformer(converted[0])
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, gguf.GGUFLinear) and module.gguf_type is not None:
            state[f"{name}.weight"] = gguf.dequantize(module.weight, module.gguf_type,
                                                      (module.out_features, module.in_features))
    assert state
    plain.load_state_dict(state, strict=False)
    cfg = model.config
    text = TextCondition(torch.randn(7, cfg.text_channels, generator=torch.Generator().manual_seed(2)))
    sched = build_schedule("0.06M", "16:9", 81, num_scales=5)
    a, b = sample(model, text, sched, seed=3), sample(plain, text, sched, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))
    c = sample(load_transformer(converted[0])[0], text, sched, seed=3)  # the unquantized model draws otherwise
    assert not all(torch.equal(x, y) for x, y in zip(a.bits, c.bits))


def test_gguf_errors_say_what_to_do(converted, tmp_path):
    _, files = converted
    with pytest.raises(ValueError, match="already quantized"):
        load_transformer(files["Q8_0"], dtype=torch.bfloat16)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(files["Q8_0"].read_bytes()[:-4096])
    with pytest.raises(ValueError, match="(truncated|not a readable GGUF).*again"):
        load_transformer(cut)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\xff" * 64)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_transformer(junk)
    with pytest.raises(ValueError, match="cannot write Q3_K"):
        gguf.convert(converted[0], tmp_path / "k.gguf", "Q3_K")


def test_convert_refuses_what_it_would_write_wrong(converted, tmp_path):
    """A GGUF source (its quantized blocks are not float tensors: they were dropped and the file did not load), an
    output named like another format, and a folder as the output are refused before any work, and a failed
    conversion leaves no file behind."""
    source, files = converted
    with pytest.raises(ValueError, match="is a GGUF file already; convert from the official weights"):
        gguf.convert(files["Q8_0"], tmp_path / "again.gguf", "Q4_K")
    with pytest.raises(ValueError, match=r"name it \*\.gguf"):
        gguf.convert(source, tmp_path / "t.safetensors", "Q8_0")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        gguf.convert(source, tmp_path / "dir.gguf", "Q8_0")

    def interrupt(done, total):
        if done == 3:
            raise KeyboardInterrupt

    opened = []
    real_open = gguf_pkg.GGUFWriter.open_output_file

    def track(writer, *a, **k):
        real_open(writer, *a, **k)
        opened.extend(writer.fout)

    with mock.patch.object(gguf_pkg.GGUFWriter, "open_output_file", track), pytest.raises(KeyboardInterrupt):
        gguf.convert(source, tmp_path / "cut.gguf", "Q8_0", progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.gguf"]
    assert opened and all(f.closed for f in opened)  # closed on the error: Windows cannot remove an open file


def test_a_quantized_head_is_refused(tiny_models, tmp_path):
    """Only the blocks' matmul weights may be quantized: the heads compute in fp32 as in the official layout."""
    reader = CheckpointReader(tiny_models["transformer_720p"])
    path = tmp_path / "bad.gguf"
    w = gguf_pkg.GGUFWriter(path, gguf.ARCH)
    for key, tensor in reader.tensors(lambda k, t: torch.float32):
        data = tensor.numpy()
        if key == "head.weight":
            w.add_tensor(key, gguf_pkg.quants.quantize(data, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(key, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="head.weight is quantized.*only the transformer blocks"):
        load_transformer(path)


def test_cli_converts_and_generates_from_a_gguf_file(tiny_models, tmp_path, capsys):
    out = tmp_path / "t.gguf"
    assert main(["convert-gguf", str(tiny_models["transformer_720p"]), str(out), "--type", "Q5_0"]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    video = tmp_path / "v.mp4"
    rc = main(["generate", "--models", str(tiny_models["root"]), "--transformer", str(out), "--resolution", "0.06M",
               "--duration", "0", "--out", str(tmp_path / "i.png")])
    assert rc == 0 and (tmp_path / "i.png").is_file() and not video.exists()
    assert "blocks GGUF Q5_0" in capsys.readouterr().err
    assert main(["generate", "--models", str(tiny_models["root"]), "--transformer", str(out), "--resolution",
                 "0.06M", "--duration", "0", "--dtype", "bf16", "--out", str(tmp_path / "j.png")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["generate", "--models", str(tiny_models["root"]), "--transformer", str(out), "--resolution",
                 "0.06M", "--steps-preview"]) == 0
    assert "(GGUF Q5_0); sampling needs" in capsys.readouterr().out
    upper = out.rename(tmp_path / "T.GGUF")  # Windows names are case-blind: listed and read as GGUF, so loaded so
    assert main(["generate", "--models", str(tiny_models["root"]), "--transformer", str(upper), "--resolution",
                 "0.06M", "--duration", "0", "--out", str(tmp_path / "k.png")]) == 0
    assert "blocks GGUF Q5_0" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
def test_a_gguf_layer_on_cuda_computes_what_it_does_on_the_cpu(name):
    """Dequantized on the GPU (also from a weight left in system RAM, as a partial load leaves it): the same
    weight as on the CPU, bit for bit, and its bf16 product within bf16 rounding."""
    qtype = Q[name]
    raw = torch.from_numpy(np.ascontiguousarray(_random_blocks(qtype, np.random.default_rng(7))))
    want = gguf.dequantize(raw, int(qtype), (ROWS, COLS), torch.bfloat16)
    assert torch.equal(gguf.dequantize(raw.cuda(), int(qtype), (ROWS, COLS), torch.bfloat16).cpu(), want)
    layer = gguf.GGUFLinear(COLS, ROWS, bias=False)
    layer.weight = torch.nn.Parameter(raw, requires_grad=False)  # stays on the CPU
    layer.gguf_type = int(qtype)
    x = torch.randn(5, COLS, dtype=torch.bfloat16)
    got = layer(x.cuda()).cpu().float()
    ref = (x.float() @ want.float().t())
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2


def test_a_field_claiming_more_items_than_the_file_holds_is_refused(tmp_path):
    """A 45-byte file whose one metadata field is an array claiming 2**62 items: the gguf package's reader would read
    empty items past the end forever (memory growing until the process dies); ours stops at the end of the file.
    Run in a child process under a memory cap and a timeout, so that a regression fails instead of hanging."""
    import subprocess
    import sys

    key = b"a"
    path = tmp_path / "crafted.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + struct.pack("<QQ", 0, 1) + struct.pack("<Q", len(key)) + key
                     + struct.pack("<II", 9, 0) + struct.pack("<Q", 2**62))  # ARRAY of UINT8
    # the cap is set after the imports, 2 GiB above what they mapped: a CUDA build of torch maps GBs of libraries
    code = ("import sys\nfrom pathlib import Path\nfrom infinitystar import gguf\n"
            "try:\n    import resource\n"
            "    mapped = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
            "    resource.setrlimit(resource.RLIMIT_AS, (mapped + (2 << 30), mapped + (2 << 30)))\n"
            "except (ImportError, OSError):\n    pass  # no cap here (not Linux): the timeout still stops a regression\n"
            "try:\n    gguf.read_header(Path(sys.argv[1]))\nexcept ValueError as e:\n    print('refused:', e)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout and "not a readable GGUF file" in done.stdout
    assert "past the end of the file" in done.stdout
