"""Test helpers: error metric, tolerances per dtype, tiny diffusers models."""

import ast
import importlib.util

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# rel-L2 against the fp32 reference, per input dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


class RecordDcgenOps(TorchDispatchMode):
    """Within: the names of the dcgen custom ops that ran (`names`), as a patched forward's fused path calls them."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "dcgen":
            self.names.add(func._opname)
        return func(*args, **(kwargs or {}))


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def assert_patch_keeps_gradients(model, inputs, checkpointing: bool = False) -> None:
    """DC-Gen fine-tunes through patched models: every parameter gradient must equal the stock one. checkpointing:
    with diffusers' gradient checkpointing, whose blocks run again in the backward pass (checked to be used)."""
    import dcgen_kernels

    checkpointed = []
    if checkpointing:
        model.enable_gradient_checkpointing()
        checkpoint = model._gradient_checkpointing_func
        model._gradient_checkpointing_func = lambda block, *args: (checkpointed.append(block),
                                                                   checkpoint(block, *args))[1]

    def grads():
        model.zero_grad()
        model(**inputs)[0].square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = grads()
    dcgen_kernels.patch(model, backend="reference")
    got = grads()
    assert got.keys() == expected.keys()
    for n in expected:  # some gradients are exactly zero in theory (e.g. a key bias under softmax): absolute floor
        assert (got[n] - expected[n]).norm() <= 1e-4 * expected[n].norm() + 1e-7, n
    assert bool(checkpointed) == checkpointing


def assert_freed_once_dropped(model, call) -> None:
    """Each patched module holds its forward bound to itself (a reference cycle, as accelerate's hooks make): after
    `call(model)` and the caller's last reference dropped, the collector must free the model, with its GPU memory
    (nothing global may keep it). The caller passes its only reference and must not keep another."""
    import gc
    import warnings
    import weakref

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # cuda_graph on the CPU: eager, warned once
        call(model)
    dropped = weakref.ref(model)
    del model
    gc.collect()
    assert dropped() is None


def assert_patched_modules_return_stock_dtypes(model, call, quant=None, fused_epilogues=()) -> None:
    """Under the caller's autocast / dtypes: every submodule that `call(model)` runs both before and after patch()
    returns the dtypes it returned stock. Recorded with a global forward hook, which the patched forwards do not see
    (a hook on a submodule would send them to diffusers' code). quant: the stock run is on the quantized layers
    (`quantize`), except the linears whose names end with one of `fused_epilogues`: patched, they return the block's
    `residual + gate * y`."""
    import dcgen_kernels

    if quant is not None:
        dcgen_kernels.quantize(model, quant=quant, backend="reference", keep_original=True)

    names = {id(module): name or "(the model)" for name, module in model.named_modules()}
    record: dict = {}

    def dtypes(out):
        if isinstance(out, (tuple, list)):
            return tuple(dtypes(x) for x in out)
        return out.dtype if torch.is_tensor(out) else type(out).__name__

    def hook(module, args, out):
        if id(module) in names:
            record.setdefault(names[id(module)], []).append(dtypes(out))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        with torch.no_grad():
            call(model)
            stock = dict(record)
            record.clear()
            quantized = {"quant": quant, "keep_original": True} if quant else {}
            dcgen_kernels.patch(model, backend="reference", **quantized)
            call(model)
    finally:
        handle.remove()
    compared = [name for name in stock if name in record and not name.endswith(tuple(fused_epilogues))]
    assert compared and dcgen_kernels.patch_report(model).replaced
    differing = {name: (stock[name], record[name]) for name in compared if record[name] != stock[name]}
    assert not differing, f"(stock, patched) output dtypes: {differing}"


def rope_tables(seq_len: int, head_dim: int, device="cpu"):
    """FLUX RoPE tables for a (txt zeros + square image grid) sequence, as FluxPosEmbed builds them."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    third = head_dim // 8 * 2
    axes = (head_dim - 2 * third, third, third)
    ids = torch.stack([torch.zeros(seq_len), torch.arange(seq_len) // 8, torch.arange(seq_len) % 8], dim=-1)
    return FluxPosEmbed(theta=10000, axes_dim=axes)(ids.to(device))


def tiny_flux(head_dim=64, heads=2, dtype=torch.float32, device="cpu"):
    from diffusers import FluxTransformer2DModel

    third = head_dim // 8 * 2
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False,
        axes_dims_rope=(head_dim - 2 * third, third, third),
    )
    with torch.no_grad():  # RMSNorm weights start at 1: randomise so the affine part is exercised
        for name, p in model.named_parameters():
            if "norm_q" in name or "norm_k" in name or "norm_added" in name:
                p.uniform_(0.5, 1.5)
    return model.to(device=device, dtype=dtype).eval()


def tiny_flux_inputs(text_tokens=7, grid=8, dtype=torch.float32, device="cpu"):
    n = grid * grid
    img_ids = torch.stack([torch.zeros(n), torch.arange(n) // grid, torch.arange(n) % grid], dim=-1)
    return dict(
        hidden_states=torch.randn(1, n, 16, dtype=dtype, device=device),
        encoder_hidden_states=torch.randn(1, text_tokens, 32, dtype=dtype, device=device),
        pooled_projections=torch.randn(1, 16, dtype=dtype, device=device),
        timestep=torch.tensor([0.5], dtype=dtype, device=device),
        img_ids=img_ids.to(device),
        txt_ids=torch.zeros(text_tokens, 3, device=device),
        return_dict=False,
    )


def tiny_sana(in_channels=8, dtype=torch.float32, device="cpu", qk_norm=None):
    from diffusers import SanaTransformer2DModel

    model = SanaTransformer2DModel(
        in_channels=in_channels, out_channels=in_channels, num_attention_heads=2, attention_head_dim=32,
        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=64,
        caption_channels=24, mlp_ratio=2.5, sample_size=8, qk_norm=qk_norm,
    )
    return model.to(device=device, dtype=dtype).eval()


def tiny_sana_inputs(in_channels=8, height=6, width=7, text_tokens=5, dtype=torch.float32, device="cpu"):
    mask = torch.ones(2, text_tokens, device=device)
    mask[1, 3:] = 0  # the second prompt is padded: the cross-attention must ignore those keys
    return dict(
        hidden_states=torch.randn(2, in_channels, height, width, dtype=dtype, device=device),
        encoder_hidden_states=torch.randn(2, text_tokens, 24, dtype=dtype, device=device),
        timestep=torch.tensor([10.0, 500.0], dtype=dtype, device=device),
        encoder_attention_mask=mask,
        return_dict=False,
    )


def add_lora(model, targets, seed=0):
    """peft LoRA adapters (rank 4) with random non-zero weights on `targets`, in place, as a trained and unmerged
    adapter leaves them (peft's default init makes them add zero); returns the model."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    return inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False),
                                   model)


def tiny_dcae(dtype=torch.float32, device="cpu"):
    """DC-AE with both block kinds (ResBlock and EfficientViTBlock), RMSNorm, multiscale attention."""
    from diffusers import AutoencoderDC

    blocks = ("ResBlock", "EfficientViTBlock")
    model = AutoencoderDC(
        in_channels=3, latent_channels=8, attention_head_dim=8, encoder_block_types=blocks,
        decoder_block_types=blocks, encoder_block_out_channels=(16, 32), decoder_block_out_channels=(16, 32),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
    )
    with torch.no_grad():  # norms start at weight 1 / bias 0: randomise so the affine part is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.1)
    return model.to(device=device, dtype=dtype).eval()


def flux_pipeline_static(name: str):
    """A static method of diffusers' FluxPipeline (`_pack_latents`, `_unpack_latents`, `_prepare_latent_image_ids`).

    Importing pipeline_flux needs `transformers`, which this project does not depend on; without it the method's
    own source (plain torch code) is compiled from the installed diffusers file, so tests still compare against
    diffusers' code rather than a copy of it.
    """
    try:
        from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

        return getattr(FluxPipeline, name)
    except ImportError:
        pass
    origin = importlib.util.find_spec("diffusers.pipelines.flux.pipeline_flux").origin
    with open(origin) as f:
        tree = ast.parse(f.read())
    pipeline = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FluxPipeline")
    fn = next(n for n in pipeline.body if isinstance(n, ast.FunctionDef) and n.name == name)
    fn.decorator_list = []
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), origin, "exec"), namespace)
    return namespace[name]


def tiny_sana_patched_latents(patch_size=1, interpolation_scale=None, in_channels=8, dtype=torch.float32,
                              device="cpu"):
    """tiny_sana with a p x p patch embedding and, given interpolation_scale, PatchEmbed's sin-cos pos-embed."""
    from diffusers import SanaTransformer2DModel

    model = SanaTransformer2DModel(
        in_channels=in_channels, out_channels=in_channels, num_attention_heads=2, attention_head_dim=32,
        num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=64,
        caption_channels=24, mlp_ratio=2.5, sample_size=8, patch_size=patch_size,
        interpolation_scale=interpolation_scale,
    )
    return model.to(device=device, dtype=dtype).eval()


# The real launchers run on CPU tensors of FLUX shapes; a stand-in driver reports an sm_90 target and the JIT's
# compile step is replaced by an offline triton.compile + ptxas -v, so the launch configs and the JIT's
# specialisation (alignment, divisibility) are exactly what an H100 compiles. Nothing is launched.
_SM90_OFFLINE_JIT = r'''
import importlib, json, os, re, subprocess, tempfile
from types import SimpleNamespace
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver, jit

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
driver.set_active(SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device=None: 0,
                                  get_current_target=lambda: TARGET))
torch.cuda.get_device_properties = lambda device=None: SimpleNamespace(multi_processor_count=132)
stats = []

def compile_offline(self, key, signature, device, constexprs, options, attrs, warmup):
    kernel = triton.compile(self.ASTSource(self, signature, constexprs, attrs), target=TARGET,
                            options=options.__dict__)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    log = subprocess.run([PTXAS, "-arch=sm_90a", "-v", "-o", os.devnull, f.name], capture_output=True, text=True)
    os.unlink(f.name)
    spill = re.search(r"(\d+) bytes spill stores", log.stdout + log.stderr)
    registers = re.search(r"Used (\d+) registers", log.stdout + log.stderr)
    stats.append(dict(kernel=self.fn.__name__, warps=options.num_warps, shared=kernel.metadata.shared,
                      spills=int(spill.group(1)) if spill else -1, registers=int(registers.group(1)),
                      wgmma=kernel.asm["ptx"].count("wgmma.mma_async"),
                      async_copies=kernel.asm["ptx"].count("cp.async.cg.shared.global"),
                      narrow_copies=kernel.asm["ptx"].count("cp.async.ca.shared.global"),
                      scalar_stores=len(re.findall(r"st\.global\.b(?:8|16|32)\b", kernel.asm["ptx"]))))

jit.JITFunction._do_compile = compile_offline
'''


def compile_launchers_for_sm90(launches: str) -> list:
    """Run `launches` (Python calling dcgen_kernels launchers on CPU tensors, then `print(json.dumps(stats))`) with
    every Triton JIT compile done offline for sm_90a; returns the per-kernel stats (kernel, warps, shared, spills,
    registers, wgmma, async_copies / narrow_copies: 16-byte cp.async.cg / 4-8-byte cp.async.ca global->shared copies,
    scalar_stores: unvectorised global stores). Runs in a subprocess outside the interpreter."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _SM90_OFFLINE_JIT + launches], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


_TINY_WORDS = ("a", "cat", "dog", "on", "the", "mat", "red", "photo", "of", "small")


def _tiny_word_tokenizer(specials, bos=None, eos=None, pad=None, model_max_length=None):
    """A whitespace word-level tokenizer over _TINY_WORDS (others -> <unk>) appending bos / eos as the real
    CLIP / T5 / Gemma tokenizers do: built offline, as the real ones would need a download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(tuple(specials) + _TINY_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = " ".join(([bos] if bos else []) + ["$A"] + ([eos] if eos else []))
    tok.post_processor = processors.TemplateProcessing(single=template,
                                                       special_tokens=[(s, vocab[s]) for s in (bos, eos) if s])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token="<unk>", model_max_length=model_max_length)


def tiny_text_pipeline(kind: str, path: str):
    """A FluxPipeline (CLIP + T5, matching tiny FLUX's pooled 16 / joint 32 dims) or SanaPipeline (Gemma 2,
    matching tiny_sana's caption_channels 24) with random tiny text encoders and no transformer / VAE, saved to
    `path`; returns the pipeline."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline, SanaPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, Gemma2Config, Gemma2Model, T5Config, T5EncoderModel

    torch.manual_seed(0)
    if kind == "flux":
        clip_tok = _tiny_word_tokenizer(["<unk>", "<|startoftext|>", "<|endoftext|>"], bos="<|startoftext|>",
                                        eos="<|endoftext|>", pad="<|endoftext|>", model_max_length=12)
        t5_tok = _tiny_word_tokenizer(["<pad>", "</s>", "<unk>"], eos="</s>", pad="<pad>", model_max_length=512)
        vocab = 3 + len(_TINY_WORDS)
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12,
                                            bos_token_id=1, eos_token_id=2, pad_token_id=2))
        t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=32, d_ff=32, d_kv=8, num_layers=1, num_heads=2))
        pipeline = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=clip.eval(),
                                tokenizer=clip_tok, text_encoder_2=t5.eval(), tokenizer_2=t5_tok, transformer=None)
    else:
        tok = _tiny_word_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>"], bos="<bos>", eos="<eos>", pad="<pad>",
                                   model_max_length=4096)
        gemma = Gemma2Model(Gemma2Config(vocab_size=4 + len(_TINY_WORDS), hidden_size=24, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=12, pad_token_id=0))
        pipeline = SanaPipeline(tokenizer=tok, text_encoder=gemma.eval(), vae=None, transformer=None,
                                scheduler=DPMSolverMultistepScheduler())
    pipeline.save_pretrained(path)
    return pipeline
