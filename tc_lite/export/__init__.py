"""Export what training made, in every format people load: kohya, peft, diffusers, and a merged text encoder.

- kohya ``.safetensors`` (the main output): what A1111 (``<lora:name:w>``), ComfyUI (``LoraLoader``, strength_clip)
  and diffusers (``pipe.load_lora_weights``) all load. Names are canonical ``lora_te_text_model_encoder_layers_…``
  (SDXL: ``lora_te1_…`` and ``lora_te2_…`` in one file) whatever transformers is installed, alpha is the real alpha
  (not the rank), and the metadata carries the ``ss_*`` keys A1111 reads to file the LoRA under SD1 or SDXL with
  the right alias (DESIGN §3, §7).
- peft adapter folder(s) and diffusers ``pytorch_lora_weights.safetensors``: for Python users of those libraries.
- merged encoders (``text_model.…`` names, one per slot): for tools that swap text encoders, and the natural output
  of a full fine-tune, which can also be turned into a LoRA by truncated SVD (:func:`extract_lora`, error reported).
- a UNet LoRA (``unet.mode: lora``) rides along in every format: ``lora_unet_`` modules in the kohya file (SD1:
  diffusers paths, SDXL: SGM paths, as kohya names them), ``unet.`` keys in the diffusers file, a ``unet/`` peft
  adapter, and a merged diffusers UNet folder (:func:`merge_unet_lora`, :func:`export_unet`).

Every format works per encoder slot; the kohya prefix says which encoder a module belongs to (``slots``), and
``lora_unet_`` the UNet (``tc_lite.unet_lora.split_unet_lora``; its names are placed by ``resolve_unet_lora``).
Modules: ``kohya`` (the kohya file and state dict), ``slots`` (prefix -> encoder), ``peft_format``,
``diffusers_format``, ``encoder`` (merged encoders and canonical names), ``unet`` (the merged UNet), ``extract``
(SVD), ``reading`` (any of these back in), ``trained`` (what a run writes), ``run_weights`` (a run folder read back,
for ``tc_lite export``).
"""

from tc_lite.export.diffusers_format import export_diffusers
from tc_lite.export.encoder import (
    canonical_encoder_key,
    encoder_path,
    encoder_state_dict,
    export_encoder,
    load_encoder_weights,
    merge_lora,
    update_retention,
)
from tc_lite.export.extract import Extraction, extract_lora
from tc_lite.export.kohya import (
    export_kohya,
    kohya_dims,
    kohya_metadata,
    lora_groups,
    read_kohya,
    safetensors_hashes,
    save_dtype_of,
    write_kohya,
)
from tc_lite.export.peft_format import export_peft
from tc_lite.export.reading import read_tuned
from tc_lite.export.slots import EncoderFormat, split_lora
from tc_lite.export.unet import export_unet, merge_unet_lora, unet_path

__all__ = [
    "EncoderFormat",
    "Extraction",
    "canonical_encoder_key",
    "encoder_path",
    "encoder_state_dict",
    "export_diffusers",
    "export_encoder",
    "export_kohya",
    "export_peft",
    "export_unet",
    "extract_lora",
    "kohya_dims",
    "kohya_metadata",
    "load_encoder_weights",
    "lora_groups",
    "merge_lora",
    "merge_unet_lora",
    "read_kohya",
    "read_tuned",
    "safetensors_hashes",
    "save_dtype_of",
    "split_lora",
    "unet_path",
    "update_retention",
    "write_kohya",
]
