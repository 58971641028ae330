"""A trained model as one GGUF file (llama.cpp's format), written with the ``gguf`` package.

Tensor names, q/k layout and hyper-parameters come from the model room
(src/model/gguf_llama.py), the tokenizer metadata from the tokenizer room
(src/tokenizer/formats.py). Tensor types, as llama.cpp's own converter chooses them:
norm gains (1-D) stay f32; every matrix is stored in the requested type. q8_0 packs rows in
blocks of 32 values, so a matrix whose rows are not a multiple of 32 long falls back to f16
(reported in the result).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from src.model.gguf_llama import GGUF_ARCH, gguf_hyperparameters, to_gguf_tensors
from src.model.gpt import GPT
from src.tokenizer.bpe import BPETokenizer
from src.tokenizer.formats import add_gguf_tokenizer

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


def write_gguf(model: GPT, tok: BPETokenizer, path: Path, gguf_type: str, name: str) -> list[str]:
    """Write ``model`` and ``tok`` to the GGUF file ``path`` with matrices in ``gguf_type``
    (one of GGUF_TYPES). Returns the names of matrices stored as f16 instead of q8_0."""
    import gguf

    qtypes = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer = gguf.GGUFWriter(path, arch=GGUF_ARCH)
    writer.add_name(name)
    writer.add_file_type(file_types[gguf_type])
    for method, value in gguf_hyperparameters(model.config).items():
        getattr(writer, method)(value)
    add_gguf_tokenizer(writer, tok, model.config.vocab_size)

    fell_back = []
    for tensor_name, tensor in to_gguf_tensors(model).items():
        data = tensor.to("cpu").float().numpy()
        qtype = qtypes[gguf_type] if data.ndim > 1 else gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = gguf.GGMLQuantizationType.F16
            fell_back.append(tensor_name)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor_name, np.ascontiguousarray(data))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(tensor_name, data.astype(np.float16))
        else:
            writer.add_tensor(tensor_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return fell_back
