"""The one model loader every job and the server use: the folder `common.models.folders` found, as a
transformers model in the dtype and quantization asked for (THUDM ChatGLM2/3 folders are converted to the
native layout once, into the glmops cache)."""

from __future__ import annotations

import shutil
from pathlib import Path

from common.errors import ModelFilesError
from common.models.folders import ModelInfo, detect, load_tokenizer, open_model_folder, resolve  # noqa: F401 - the API


def _cache_root() -> Path:
    from common.registry import cache_dir

    return cache_dir()


def native_folder(info: ModelInfo) -> Path:
    """A native-layout folder for `info`: itself, or a converted copy (made once, then reused)."""
    if info.layout == "native" or info.family == "chatglm":
        return info.path
    import hashlib

    from common.models.convert import convert_to_native

    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in sorted(info.path.iterdir()))
    key = hashlib.sha256(f"{info.path.resolve()}|{stamp}".encode()).hexdigest()[:16]
    out = _cache_root() / "converted" / f"{info.path.name}-{key}"
    if not (out / "glmops.json").is_file():
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"converting {info.name} from THUDM's layout to native GLM once, into {out}", flush=True)
        convert_to_native(info, tmp)
        tmp.rename(out)
    return out


def quantization_config(bits: int, compute_dtype, quant_type: str = "nf4", double_quant: bool = True):
    """bitsandbytes settings for 4 or 8 bits (None for 16)."""
    if bits == 16:
        return None
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype,
                                  llm_int8_skip_modules=["lm_head", "output_layer"])
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head", "output_layer"])
    raise ValueError(f"bits must be 4, 8 or 16, not {bits}")


def load_model(info: ModelInfo, *, bits: int = 16, dtype=None, device: str | None = "cpu",
               trust_remote_code: bool = False, quant_type: str = "nf4", double_quant: bool = True):
    """The model for a detected folder, in `dtype`, optionally quantized with bitsandbytes."""
    import logging

    import torch
    from transformers import AutoModelForCausalLM

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional hub-kernel notice on CPU
    dtype = dtype or torch.float32
    kwargs = {"dtype": dtype, "quantization_config": quantization_config(bits, dtype, quant_type, double_quant)}
    if device is not None:
        kwargs["device_map"] = device
    if bits in (4, 8):
        _require_bitsandbytes(device)
    try:
        if info.family == "chatglm" and info.layout == "thudm":
            from common.models.convert_glm import chatglm1_config_from_thudm
            from common.models.modeling_chatglm1 import ChatGLM1ForCausalLM

            model = ChatGLM1ForCausalLM.from_pretrained(info.path, config=chatglm1_config_from_thudm(info.path),
                                                        **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(native_folder(info), trust_remote_code=trust_remote_code,
                                                         **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        msg = str(err).split("\n")[0][:400]
        if "size mismatch" in str(err) or "shape" in msg:
            raise ModelFilesError(
                f"{info.path}: the weights do not fit config.json ({msg}). The config and the weight files "
                "come from different models; download the folder again."
            ) from None
        raise ModelFilesError(f"{info.path}: cannot load the model: {msg}") from None
    if bits == 4 and (device is None or str(device).startswith("cpu")):
        _disable_cpu_packed_4bit(model)
    return model


def _disable_cpu_packed_4bit(model) -> None:
    """bitsandbytes repacks 4-bit weights for a fast CPU path on AVX512-BF16 machines; that path needs
    dims divisible by its block size and breaks training after an eval pass (stack-notes §1.3)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _require_bitsandbytes(device: str | None) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means the same to the user
        raise ModelFilesError(
            f"4/8-bit loading needs bitsandbytes, which cannot be imported here ({err}). "
            "Install it (`pip install bitsandbytes`) or pass --bits 16."
        ) from None
