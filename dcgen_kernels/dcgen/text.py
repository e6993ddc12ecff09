"""Text conditioning for the DC-Gen training stages: prompts -> the ``--text-embeds`` file of align-head / lora.

The embeddings come from the text encoders of a local diffusers pipeline directory (``FluxPipeline``: CLIP's pooled
vector and T5's tokens; ``SanaPipeline``: Gemma's tokens and attention mask), through the pipeline's own
``encode_prompt``, so training sees exactly what inference feeds the transformer: same tokenizer padding and
truncation, SANA's complex human instruction when its pipeline applies it by default. The null prompt is ``""``
encoded the way each pipeline encodes its unconditional branch. Only the text encoders and tokenizers load
(``transformer=None, vae=None``); nothing downloads.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from typing import Dict, List, Optional, Sequence

import torch

from .convert import _check_positive_int
from .data import _META_KEY, DataError, read_json

__all__ = ["TEXT_PIPELINES", "load_text_pipeline", "encode_prompts", "read_prompts", "save_text_embeddings"]

TEXT_PIPELINES = ("FluxPipeline", "SanaPipeline")
FLUX_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline.check_inputs


def load_text_pipeline(path: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """The text encoders and tokenizers of the FluxPipeline / SanaPipeline saved in the local directory `path`
    (``model_index.json`` names the class), in `dtype` on `device`; transformer and VAE are not loaded."""
    import diffusers

    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
    index = os.path.join(path or "", "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{path!r} is not a local diffusers pipeline directory (no model_index.json); give "
                                f"the directory of a FluxPipeline or SanaPipeline checkpoint (nothing is "
                                f"downloaded)")
    name = read_json(index).get("_class_name")
    if name not in TEXT_PIPELINES:
        raise DataError(f"{path}: model_index.json names pipeline class {name!r}; supported: "
                        f"{', '.join(TEXT_PIPELINES)}")
    try:
        with warnings.catch_warnings():  # diffusers >= 0.36 renames torch_dtype to dtype; older ones take only this
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            pipeline = getattr(diffusers, name).from_pretrained(path, transformer=None, vae=None, torch_dtype=dtype,
                                                                local_files_only=True)
    except (OSError, ValueError) as e:  # transformers raises ValueError for a tokenizer folder it cannot read
        raise FileNotFoundError(f"{name}: could not load the text encoders from local directory {path!r}: {e}") \
            from e
    encoders = ("text_encoder", "text_encoder_2") if name == "FluxPipeline" else ("text_encoder",)
    missing = [e for e in encoders + tuple(e.replace("text_encoder", "tokenizer") for e in encoders)
               if getattr(pipeline, e, None) is None]
    if missing:
        raise DataError(f"{path}: the pipeline has no {', '.join(missing)} (needed to encode prompts)")
    return pipeline.to(device)


def read_prompts(path: str) -> List[str]:
    """One prompt per line (\\n or \\r\\n) of the UTF-8 text file `path` (a byte-order mark is dropped; a final
    newline ends the last line); an empty line is refused: as a prompt it would silently train that image
    unconditionally."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path!r} does not exist")
    with open(path, encoding="utf-8-sig", newline="") as f:
        text = f.read()
    # not str.splitlines: it also splits at form feeds, U+2028 and other separators a prompt may hold
    prompts = [line.removesuffix("\r") for line in text.split("\n")]
    if prompts[-1] == "":
        prompts.pop()
    empty = [i + 1 for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise DataError(f"prompts file {path!r}: line(s) {empty[:5]} are empty; write one prompt per line")
    if not prompts:
        raise DataError(f"prompts file {path!r} holds no prompts")
    return prompts


def encode_prompts(pipeline, prompts: Sequence[str], *, max_sequence_length: Optional[int] = None,
                   complex_human_instruction: bool = True, batch_size: int = 8) -> Dict[str, torch.Tensor]:
    """The ``--text-embeds`` tensors (CPU) of `prompts` and of the null prompt, encoded by `pipeline`'s
    ``encode_prompt`` in batches of `batch_size`.

    FLUX: ``encoder_hidden_states`` (N, L, D), ``pooled_projections`` (N, P), ``null_encoder_hidden_states``
    (L, D), ``null_pooled_projections`` (P,). SANA: ``encoder_hidden_states``, ``encoder_attention_mask`` (N, L)
    and their ``null_`` versions. `max_sequence_length` defaults to the pipeline's own default (FLUX 512: give
    256 for schnell, as its pipeline is called; SANA 300). `complex_human_instruction` (SANA only): prepend the
    instruction SanaPipeline applies by default (the null prompt never gets it, as in the pipeline).
    """
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a non-empty sequence of str")
    _check_positive_int("batch_size", batch_size)
    name = type(pipeline).__name__
    if name not in TEXT_PIPELINES:
        raise TypeError(f"pipeline must be one of {', '.join(TEXT_PIPELINES)}, got {name}")
    defaults = inspect.signature(type(pipeline).__call__).parameters
    length = defaults["max_sequence_length"].default if max_sequence_length is None else max_sequence_length
    _check_positive_int("max_sequence_length", length)
    if name == "FluxPipeline" and length > FLUX_MAX_SEQUENCE_LENGTH:  # FluxPipeline refuses more at inference
        raise ValueError(f"max_sequence_length must be <= {FLUX_MAX_SEQUENCE_LENGTH} for FLUX, got {length}")
    blank = [i for i, p in enumerate(prompts) if not p.strip()]
    if blank:  # the null prompt's embedding: those images would train unconditionally
        raise ValueError(f"prompts {blank[:5]} are blank; give every image a prompt")
    device = pipeline.text_encoder.device
    batches = [list(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
    with torch.no_grad():
        if name == "FluxPipeline":
            rows = [pipeline.encode_prompt(b, device=device, max_sequence_length=length)[:2] for b in batches]
            null_text, null_pooled, _ = pipeline.encode_prompt([""], device=device, max_sequence_length=length)
            out = dict(encoder_hidden_states=torch.cat([r[0] for r in rows]),
                       pooled_projections=torch.cat([r[1] for r in rows]),
                       null_encoder_hidden_states=null_text[0], null_pooled_projections=null_pooled[0])
        else:
            instruction = defaults["complex_human_instruction"].default if complex_human_instruction else None
            rows = [pipeline.encode_prompt(b, do_classifier_free_guidance=False, device=device,
                                           max_sequence_length=length, complex_human_instruction=instruction)[:2]
                    for b in batches]
            # the unconditional branch: "" as SanaPipeline encodes its negative prompt (no instruction)
            *_, null_text, null_mask = pipeline.encode_prompt([""], do_classifier_free_guidance=True,
                                                              negative_prompt="", device=device,
                                                              max_sequence_length=length)
            out = dict(encoder_hidden_states=torch.cat([r[0] for r in rows]),
                       encoder_attention_mask=torch.cat([r[1] for r in rows]),
                       null_encoder_hidden_states=null_text[0], null_encoder_attention_mask=null_mask[0])
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def save_text_embeddings(path: str, tensors: Dict[str, torch.Tensor], meta: Optional[Dict] = None) -> None:
    """Write `encode_prompts`' tensors to the safetensors file `path`; `meta` (JSON-serialisable) goes into its
    metadata under ``"dcgen"``."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata={_META_KEY: json.dumps(meta or {}, sort_keys=True)})
