"""PEFT LoRA adapter <-> GGUF LoRA adapter, with the ``gguf`` package (our own small converter).

llama.cpp applies a LoRA adapter from a GGUF file whose metadata says ``general.type=adapter``,
``adapter.type=lora``, ``adapter.lora.alpha`` and ``general.architecture`` (must equal the base
model's), and whose tensors come in pairs ``<base tensor name>.lora_a`` / ``.lora_b``, e.g.
``blk.3.attn_q.weight.lora_a``. Orientation (checked against llama.cpp's ``llama-adapter.cpp``):
with the base weight of ggml shape ``ne = [in, out]``, llama.cpp requires ``a.ne = [in, r]`` and
``b.ne = [r, out]``. ggml's ``ne`` is numpy's shape reversed, so PEFT's ``lora_A.weight``
(numpy ``(r, in)``) and ``lora_B.weight`` (numpy ``(out, r)``) are written as they are. The
scale llama.cpp applies is ``alpha / r`` (times the per-call adapter scale), PEFT's own scale
without rsLoRA, so the same ``alpha`` goes into the file.

Only LoRA on linear layers is supported (attention q/k/v/o and MLP gate/up/down); PEFT's
rsLoRA, DoRA and embedding LoRA are refused with an error rather than converted wrongly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from agentsoc.atomic import temp_path

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


class LoraConversionError(ValueError):
    pass


def _gguf() -> Any:
    import gguf

    return gguf


def base_info(base_gguf: Path) -> tuple[str, int, dict[str, tuple[int, ...]]]:
    """(architecture, block count, {tensor name: ggml ne}) of a base GGUF model."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(base_gguf))
    arch_field = reader.fields["general.architecture"]
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
    block_field = reader.fields[f"{arch}.block_count"]
    n_blocks = int(block_field.parts[block_field.data[0]][0])
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    return arch, n_blocks, shapes


def _arch_enum(arch: str) -> Any:
    gguf = _gguf()
    for enum_value, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return enum_value
    raise LoraConversionError(f"architecture {arch!r} is unknown to the gguf package")


def load_peft_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(adapter_config.json, {key: float32 array}) of a PEFT adapter directory."""
    from safetensors.numpy import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    raw = load_file(str(adapter_dir / "adapter_model.safetensors"))
    tensors = {k: np.asarray(v, dtype=np.float32) for k, v in raw.items()}
    return config, tensors


def peft_to_gguf(
    adapter_dir: Path,
    out_path: Path,
    *,
    base_gguf: Path,
    name: str = "agentsoc-lora",
) -> Path:
    """Convert a PEFT LoRA adapter directory into a GGUF LoRA adapter for ``base_gguf``.

    Written to a temporary name and renamed, so a reader never sees half a file.
    """
    config, tensors = load_peft_adapter(adapter_dir)
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraConversionError(f"only LoRA adapters convert, not {config.get('peft_type')}")
    if config.get("use_rslora") or config.get("use_dora"):
        raise LoraConversionError("rsLoRA / DoRA adapters are not supported by this converter")
    alpha = float(config["lora_alpha"])
    pairs = peft_pairs(tensors)
    arch, n_blocks, shapes = base_info(base_gguf)
    name_map = _gguf().get_tensor_name_map(_arch_enum(arch), n_blocks)
    out_tensors: list[tuple[str, np.ndarray]] = []
    for module, (a, b) in sorted(pairs.items()):
        gguf_name = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise LoraConversionError(f"no GGUF tensor name for module {module!r} of architecture {arch}")
        if gguf_name.startswith("token_embd"):
            raise LoraConversionError("LoRA on the token embedding is not supported")
        ne = shapes.get(gguf_name)
        if ne is None:
            raise LoraConversionError(f"base model has no tensor {gguf_name!r} (module {module!r})")
        # base ne = [in, out]; numpy a = (r, in) -> ne [in, r]; b = (out, r) -> ne [r, out]
        if a.shape[1] != ne[0] or b.shape[0] != ne[1] or a.shape[0] != b.shape[1]:
            raise LoraConversionError(
                f"{module}: lora_A {a.shape} / lora_B {b.shape} do not fit base tensor {gguf_name} ne={ne}"
            )
        out_tensors.append((gguf_name + ".lora_a", np.ascontiguousarray(a)))
        out_tensors.append((gguf_name + ".lora_b", np.ascontiguousarray(b)))
    if not out_tensors:
        raise LoraConversionError(f"no LoRA tensors found in {adapter_dir}")
    return write_gguf_adapter(out_path, arch=arch, alpha=alpha, tensors=out_tensors, name=name)


def peft_pairs(tensors: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Group PEFT ``...<module>.lora_A/B.weight`` tensors into ``{module: (A, B)}``."""
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise LoraConversionError(f"unexpected tensor {key!r} in PEFT adapter (only lora_A/lora_B supported)")
        halves.setdefault(m["module"], {})[m["ab"]] = value
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise LoraConversionError(f"{module}: has {sorted(ab)} but needs both lora_A and lora_B")
        pairs[module] = (ab["A"], ab["B"])
    return pairs


def write_gguf_adapter(
    out_path: Path, *, arch: str, alpha: float, tensors: list[tuple[str, np.ndarray]], name: str
) -> Path:
    gguf = _gguf()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out_path)
    writer = gguf.GGUFWriter(str(tmp), arch=arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for tensor_name, array in tensors:
        writer.add_tensor(tensor_name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out_path)
    return out_path


def read_gguf_adapter(path: Path) -> tuple[str, float, dict[str, np.ndarray]]:
    """(architecture, alpha, {tensor name: array in numpy orientation}) of a GGUF LoRA adapter."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return None
        part = f.parts[f.data[0]]
        return bytes(part).decode() if f.types and f.types[0] == gguf.GGUFValueType.STRING else part[0]

    if field("general.type") != "adapter" or field("adapter.type") != "lora":
        raise LoraConversionError(f"{path} is not a GGUF LoRA adapter")
    arch = str(field("general.architecture"))
    alpha = float(field("adapter.lora.alpha") or 0.0)
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        # GGUFReader exposes data in numpy orientation already (shape = reversed ne)
        out[t.name] = np.array(t.data, dtype=np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))
    return arch, alpha, out
