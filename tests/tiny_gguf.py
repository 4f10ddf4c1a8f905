"""A tiny llama-architecture GGUF model for the llama-server tests, written with ``gguf``.

Random weights (seeded, so the file is the same for the same inputs), two layers of width 64
in f32 and a byte-level SentencePiece vocabulary (``<unk>``, ``<s>``, ``</s>`` and the 256
``<0xNN>`` byte tokens): about 470 KB, and fast on a CPU. It says nothing sensible; it is
there so that a real server tokenizes, prefills and decodes. Cached by its inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np

from egpu.paths import dirs

# SentencePiece token types as GGUF stores them (gguf.TokenType)
SPECIALS = (("<unk>", gguf.TokenType.UNKNOWN), ("<s>", gguf.TokenType.CONTROL),
            ("</s>", gguf.TokenType.CONTROL))
BYTE_TOKENS = 256
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
WEIGHT_SCALE = 0.02  # small random weights keep activations finite through the layers


@dataclass(frozen=True)
class TinyModel:
    layers: int = 2
    width: int = 64
    heads: int = 4
    ffn: int = 128
    context: int = 8192
    seed: int = 11

    @property
    def vocab(self) -> int:
        return len(SPECIALS) + BYTE_TOKENS

    def key(self) -> str:
        doc = {**asdict(self), "gguf": getattr(gguf, "__version__", "?"), "format": 1}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _tensors(model: TinyModel) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(model.seed)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * WEIGHT_SCALE).astype(np.float32)

    ones = np.ones(model.width, dtype=np.float32)
    out = {"token_embd.weight": rand(model.vocab, model.width),
           "output_norm.weight": ones, "output.weight": rand(model.vocab, model.width)}
    for i in range(model.layers):
        # numpy shape is (rows, columns) = GGUF's ne reversed: (out features, in features)
        out |= {f"blk.{i}.attn_norm.weight": ones,
                f"blk.{i}.attn_q.weight": rand(model.width, model.width),
                f"blk.{i}.attn_k.weight": rand(model.width, model.width),
                f"blk.{i}.attn_v.weight": rand(model.width, model.width),
                f"blk.{i}.attn_output.weight": rand(model.width, model.width),
                f"blk.{i}.ffn_norm.weight": ones,
                f"blk.{i}.ffn_gate.weight": rand(model.ffn, model.width),
                f"blk.{i}.ffn_up.weight": rand(model.ffn, model.width),
                f"blk.{i}.ffn_down.weight": rand(model.width, model.ffn)}
    return out


def write(model: TinyModel, path: Path) -> None:
    """Write ``model`` as a GGUF file at ``path``."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("egpu tiny test model")
    w.add_context_length(model.context)
    w.add_embedding_length(model.width)
    w.add_block_count(model.layers)
    w.add_feed_forward_length(model.ffn)
    w.add_head_count(model.heads)
    w.add_head_count_kv(model.heads)
    w.add_rope_dimension_count(model.width // model.heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(model.vocab)
    tokens = [t for t, _ in SPECIALS] + [f"<0x{b:02X}>" for b in range(BYTE_TOKENS)]
    types = [int(k) for _, k in SPECIALS] + [int(gguf.TokenType.BYTE)] * BYTE_TOKENS
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_unk_token_id(UNK_ID)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    for name, data in _tensors(model).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_model(model: TinyModel | None = None) -> Path:
    """The model file in the shared cache, written once per set of inputs."""
    model = model or TinyModel()
    base = dirs().cache / "tests" / "tiny-gguf"
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"{model.key()}.gguf"
    if not path.exists():
        partial = base / f"{model.key()}.{os.getpid()}.partial"
        write(model, partial)
        partial.rename(path)
    return path
