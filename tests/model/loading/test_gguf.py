"""GGUF loading: small Llama files written here with the `gguf` package (q/k rows permuted the way
llama.cpp's converter stores them, every supported quantisation), loaded back exactly; clear errors for
what cannot be served; and the built-in file's config and metadata."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, quants

from model.config import preset
from model.loading.gguf_file import SUPPORTED_TYPES, load_gguf, load_gguf_model
from model.text.tokenizer import byte_alphabet
from tests.default_model import default_gguf_path
from tests.helpers import perturbed_model

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
MERGES = ["h e", "Ġ t", "t he", "Ġt he", "i n"]
LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def vocabulary() -> list[str]:
    merged = ["".join(m.split(" ")) for m in MERGES]
    return SPECIALS + list(byte_alphabet().values()) + merged


def tiny_config(**overrides):
    return preset("llama-tiny").replace(vocab_size=len(vocabulary()), num_kv_heads=1, **overrides)


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """The row order llama.cpp's converter writes q/k in: each head's halves interleaved as pairs."""
    rows, cols = weight.shape
    return weight.reshape(num_heads, 2, rows // num_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_name(key: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if key in fixed:
        return fixed[key]
    _, _, index, rest = key.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{index}.{LAYER_NAMES[module]}.{suffix}"


def write_gguf(path, cfg, state: dict[str, torch.Tensor], qtype: Q = Q.F32, arch: str = "llama",
               extra_tensors: dict[str, np.ndarray] | None = None, skip: tuple[str, ...] = (),
               extra_kv: dict | None = None) -> dict[str, np.ndarray]:
    """Write `state` (our names) as a llama.cpp-style GGUF; 2-D weights in `qtype`, norms in F32.
    Returns what each tensor dequantises to (in our row order), as the loader must give it."""
    writer = GGUFWriter(str(path), arch)
    writer.add_name("tiny test llama")
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_context)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(vocabulary())
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(vocabulary()) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    for key, value in (extra_kv or {}).items():
        writer.add_string(key, value)
    expected = {}
    for key, tensor in state.items():
        name = gguf_name(key)
        if name in skip:
            continue
        array = tensor.float().numpy()
        stored = array
        if ".attn_q." in name:
            stored = llama_cpp_permute(array, cfg.num_heads)
        elif ".attn_k." in name:
            stored = llama_cpp_permute(array, cfg.num_kv_heads)
        kind = qtype if array.ndim == 2 else Q.F32
        if kind == Q.F32:
            writer.add_tensor(name, stored)
            expected[key] = array
        elif kind == Q.F16:
            writer.add_tensor(name, stored.astype(np.float16))
            expected[key] = array.astype(np.float16).astype(np.float32)
        else:
            packed = quants.quantize(stored, kind)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=kind)
            expected[key] = quants.dequantize(quants.quantize(array, kind), kind)   # row-local, order-free
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="module")
def tiny():
    return perturbed_model(tiny_config(), seed=5, std=0.1)


def test_float32_round_trip_undoes_the_permutation(tiny, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny.config, tiny.state_dict())
    loaded = load_gguf(path)
    assert loaded.config == tiny.config.replace(bos_token_id=1, eos_token_id=2)
    original = tiny.state_dict()
    assert set(loaded.state_dict) == set(original)
    for key, tensor in original.items():
        assert torch.equal(loaded.state_dict[key], tensor), key
    model = loaded.build_model()
    assert loaded.state_dict == {} and loaded.model is model
    ids = torch.tensor([[5, 70, 263, 9, 120, 44, 61, 200, 13, 99]])
    with torch.no_grad():
        torch.testing.assert_close(model.forward_full(ids), tiny.forward_full(ids), rtol=0, atol=0)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0], ids=lambda q: q.name)
def test_quantised_tensors_dequantise_exactly(tiny, tmp_path, qtype):
    """Each weight equals what `gguf` itself dequantises the stored blocks to (q/k rows back in our
    order), and stays within the format's rounding of the original."""
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    expected = write_gguf(path, tiny.config, tiny.state_dict(), qtype=qtype)
    loaded = load_gguf(path)
    assert loaded.metadata["tensor_types"][qtype.name] == sum(t.dim() == 2 for t in tiny.state_dict().values())
    tolerance = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.01, "Q5_0": 0.05, "Q5_1": 0.05}.get(qtype.name, 0.12)
    for key, original in tiny.state_dict().items():
        got = loaded.state_dict[key]
        assert got.dtype == torch.float32 and got.shape == original.shape
        assert np.array_equal(got.numpy(), expected[key]), key
        scale = float(original.abs().max())
        assert float((got - original).abs().max()) <= tolerance * scale, key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_in_a_lower_dtype(tiny, tmp_path, dtype):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny.config, tiny.state_dict(), qtype=Q.Q8_0)
    exact = load_gguf(path).state_dict
    low = load_gguf_model(path, dtype=dtype)
    for key, tensor in low.model.state_dict().items():
        assert tensor.dtype == dtype
        assert torch.equal(tensor, exact[key].to(dtype)), key


def test_tied_and_untied_output(tmp_path):
    tied_cfg = tiny_config(tie_word_embeddings=True)
    tied = perturbed_model(tied_cfg, seed=2)
    write_gguf(tmp_path / "tied.gguf", tied_cfg, tied.state_dict())
    loaded = load_gguf_model(tmp_path / "tied.gguf")
    assert loaded.config.tie_word_embeddings and not hasattr(loaded.model, "lm_head")
    ids = torch.tensor([[3, 99, 7, 250]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.forward_full(ids), tied.forward_full(ids), rtol=0, atol=0)
    untied = perturbed_model(tiny_config(), seed=2)
    write_gguf(tmp_path / "untied.gguf", untied.config, untied.state_dict())
    loaded = load_gguf(tmp_path / "untied.gguf")
    assert not loaded.config.tie_word_embeddings and "lm_head.weight" in loaded.state_dict


def test_k_quants_load_through_the_same_path(tmp_path):
    """K-quant blocks (256 values) as `gguf` dequantises them; a hand-made Q4_K/Q6_K file."""
    from gguf import GGML_QUANT_SIZES, GGUFReader

    from model.loading.gguf_file import dequantise
    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    raw = {}
    for qtype in (Q.Q4_K, Q.Q6_K):
        block, size = GGML_QUANT_SIZES[qtype]
        data = rng.integers(0, 256, size=(3, size * 2), dtype=np.uint8)     # 3 rows of 512 values
        half = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
        for b in range(2):                                                   # finite f16 scales
            start = b * size
            if qtype == Q.Q4_K:
                data[:, start:start + 2] = half
                data[:, start + 2:start + 4] = half
            else:
                data[:, start + size - 2:start + size] = half
        writer.add_tensor(f"t_{qtype.name}", data, raw_shape=data.shape, raw_dtype=qtype)
        raw[qtype] = data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for tensor in GGUFReader(str(tmp_path / "k.gguf")).tensors:
        qtype = tensor.tensor_type
        got = dequantise(tensor, torch.float32)
        assert got.shape == (3, 512) and torch.isfinite(got).all()
        assert np.array_equal(got.numpy(), quants.dequantize(raw[qtype], qtype))


def test_tokenizer_template_and_metadata_from_the_file(tiny, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny.config, tiny.state_dict())
    loaded = load_gguf(path)
    assert loaded.chat_template == TEMPLATE and loaded.name == "tiny test llama"
    tok = loaded.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (1, 2, tiny.config.vocab_size)
    ids = tok.encode("the theater <|im_end|> 42")
    assert ids[0] == vocabulary().index("the") and 2 in ids
    assert tok.decode(ids, skip_special_tokens=False) == "the theater <|im_end|> 42"
    from tokenizers import Tokenizer
    assert Tokenizer.from_str(loaded.tokenizer_json).encode("the theater").ids == tok.encode("the theater")
    meta = loaded.metadata
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == tiny.config.num_layers
    assert meta["tokenizer.ggml.tokens"] == f"<array of {len(vocabulary())}>"
    assert meta["tensor_count"] == len(tiny.state_dict()) and meta["tensor_types"] == {"F32": meta["tensor_count"]}


def test_a_file_whose_tokenizer_we_cannot_build_still_loads(tiny, tmp_path):
    path = tmp_path / "other-pre.gguf"
    write_gguf(path, tiny.config, tiny.state_dict())
    from gguf import GGUFReader
    loaded = load_gguf_model(path)      # the tokenizer is built only when asked for
    assert loaded.model is not None
    fields = {k: f.contents() for k, f in GGUFReader(str(path)).fields.items() if k.startswith("tokenizer.")}
    loaded.tokenizer_fields = {**fields, "tokenizer.ggml.pre": "exotic"}
    with pytest.raises(ValueError, match="pre-tokenizer 'exotic' is not supported"):
        loaded.tokenizer


def test_errors_are_clear(tiny, tmp_path):
    state = tiny.state_dict()
    cases = {
        "architecture 'qwen2' is not supported": dict(arch="qwen2"),
        "RoPE scaling": dict(extra_tensors={"rope_freqs.weight": np.ones(8, dtype=np.float32)}),
        "RoPE scaling \\(linear\\)": dict(extra_kv={"llama.rope.scaling.type": "linear"}),
        "blk.0.attn_q.bias has no place": dict(extra_tensors={"blk.0.attn_q.bias": np.zeros(64, dtype=np.float32)}),
        "missing keys: model.layers.1.mlp.up_proj.weight": dict(skip=("blk.1.ffn_up.weight",)),
    }
    for i, (message, kwargs) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.gguf"
        write_gguf(path, tiny.config, state, **kwargs)
        with pytest.raises(ValueError, match=message):
            load_gguf_model(path)
    path = tmp_path / "iq.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 18), dtype=np.uint8), raw_shape=(4, 18),
                      raw_dtype=Q.IQ4_NL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="quantisation type IQ4_NL is not supported"):
        from gguf import GGUFReader

        from model.loading.gguf_file import dequantise
        dequantise(GGUFReader(str(path)).tensors[0], torch.float32)
    (tmp_path / "not.gguf").write_bytes(b"this is not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_gguf(tmp_path / "not.gguf")
    with pytest.raises(ValueError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")
    assert {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "F32"} <= SUPPORTED_TYPES


def test_builtin_file_config_metadata_and_logging(caplog):
    caplog.set_level(logging.INFO, logger="customllm.gguf")
    loaded = load_gguf_model(default_gguf_path(), dtype=torch.bfloat16)
    assert loaded.config == preset("smollm2-135m")
    assert loaded.metadata["tensor_types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    assert loaded.metadata["tokenizer.ggml.pre"] == "smollm" and loaded.metadata["llama.context_length"] == 8192
    assert sum(p.numel() for p in loaded.model.parameters()) == 134_515_008
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    phases = [r.getMessage() for r in caplog.records if r.name == "customllm.gguf"]
    assert len(phases) == 3 and "dequantised to bfloat16" in phases[1] and "model on cpu" in phases[2]
