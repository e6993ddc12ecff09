"""Temporary GPU sweep for sana_linear_attention (removed after the run)."""
import json, os, subprocess, sys, time
import torch, triton, triton.language as tl
from triton.testing import do_bench
import sys as _s, dcgen_kernels.ops.sana_linear_attention; m = _s.modules["dcgen_kernels.ops.sana_linear_attention"]
from dcgen_kernels.triton_kernels.sana_linear_attention import linear_attention_kv_kernel as KV, linear_attention_out_kernel as OUT

T0 = time.time()
OUTDIR = os.environ.get("OUT", "/tmp")
LOG = open(os.path.join(OUTDIR, "results.jsonl"), "w")
SM = torch.cuda.get_device_properties(0).multi_processor_count
print(torch.cuda.get_device_name(0), "SMs", SM, "torch", torch.__version__, "triton", triton.__version__, flush=True)

def rec(**kw):
    kw["t"] = round(time.time() - T0, 1)
    LOG.write(json.dumps(kw) + "\n"); LOG.flush(); print(kw, flush=True)

if sys.argv[1:2] == ["tests"]:
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_sana_linear_attention.py", "-x"],
                       capture_output=True, text=True, timeout=90)
    print(r.stdout[-3000:], r.stderr[-2000:], flush=True)

x = torch.empty(2**27, dtype=torch.bfloat16, device="cuda"); y = torch.empty_like(x)
ms = do_bench(lambda: y.copy_(x), warmup=10, rep=50)
COPY = 2 * x.numel() * 2 / ms / 1e9
rec(kind="copy", TBps=COPY / 1e3)
del x, y

DT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}

def kv_fn(k4, v4, BN, W, S, P):
    B, H, N, D = k4.shape; PD = m._padded_dim(D)
    tokens, splits = m._token_slices(N, BN, B * H, P * SM)
    kvp = torch.empty(B * H, splits, PD, PD, dtype=torch.float32, device="cuda")
    ks = torch.empty(B * H, splits, PD, dtype=torch.float32, device="cuda")
    f = lambda: KV[(B * H, splits)](k4, v4, kvp, ks, N, H, tokens, *k4.stride(), *v4.stride(), HEAD_DIM=D,
                                     PADDED_DIM=PD, BLOCK_N=BN, DOT_DTYPE=DT[k4.dtype], num_warps=W, num_stages=S)
    return f, kvp, ks, splits

def out_fn(q4, kvp, ks, splits, o4, BM, W, S, P):
    B, H, N, D = q4.shape; PD = m._padded_dim(D)
    tokens, qs = m._token_slices(N, BM, B * H, P * SM)
    half = q4.dtype != torch.float32
    return lambda: OUT[(B * H, qs)](q4, kvp, ks, o4, N, H, splits, tokens, 1e-15, *q4.stride(), *o4.stride(),
                                     HEAD_DIM=D, PADDED_DIM=PD, BLOCK_M=BM, SPLIT_KV=half,
                                     SPLIT_Q=q4.dtype == torch.float16, PART_DTYPE=tl.bfloat16, num_warps=W, num_stages=S)

def views(case):
    name, layout, B, H, N, D, dt = case
    if layout == "tok":
        q, k, v = torch.randn(B, N, 3 * H * D, device="cuda").to(dt).chunk(3, -1)
        o = torch.empty(B, N, H * D, dtype=dt, device="cuda")
        return [m._by_head(t, H) for t in (q, k, v, o)]
    q, k, v = torch.randn(B, H * 3 * D, N, device="cuda").to(dt).reshape(B, H, 3 * D, N).chunk(3, 2)
    o = torch.empty(B, H, D, N, dtype=dt, device="cuda")
    return [t.transpose(2, 3) for t in (q, k, v, o)]

def sweep(case, kv_cfgs, out_cfgs, progs, budget):
    name, layout, B, H, N, D, dt = case
    q4, k4, v4, o4 = views(case)
    esz = q4.element_size(); tensor_bytes = B * H * N * D * esz
    best_kv = best_out = None
    for BN, W, S in kv_cfgs:
        for P in progs:
            if time.time() - T0 > budget: return
            try:
                f, kvp, ks, splits = kv_fn(k4, v4, BN, W, S, P); f(); torch.cuda.synchronize()
                t = do_bench(f, warmup=5, rep=25)
            except Exception as e:
                rec(case=name, kernel="kv", cfg=[BN, W, S, P], error=str(e)[:200]); continue
            rec(case=name, kernel="kv", cfg=[BN, W, S, P], us=round(t * 1e3, 1), pct=round(100 * 2 * tensor_bytes / t / 1e9 / COPY, 1))
            if best_kv is None or t < best_kv[0]: best_kv = (t, (BN, W, S, P))
    f, kvp, ks, splits = kv_fn(k4, v4, *best_kv[1]); f()
    for BM, W, S in out_cfgs:
        for P in progs:
            if time.time() - T0 > budget: return
            try:
                g = out_fn(q4, kvp, ks, splits, o4, BM, W, S, P); g(); torch.cuda.synchronize()
                t = do_bench(g, warmup=5, rep=25)
            except Exception as e:
                rec(case=name, kernel="out", cfg=[BM, W, S, P], error=str(e)[:200]); continue
            rec(case=name, kernel="out", cfg=[BM, W, S, P], us=round(t * 1e3, 1), pct=round(100 * 2 * tensor_bytes / t / 1e9 / COPY, 1))
            if best_out is None or t < best_out[0]: best_out = (t, (BM, W, S, P))
    total = best_kv[0] + best_out[0]
    rec(case=name, best_kv=best_kv, best_out=best_out, total_us=round(total * 1e3, 1),
        pct_of_copy=round(100 * 4 * tensor_bytes / total / 1e9 / COPY, 1))
    # whole op with the shipped defaults (both kernels + workspace allocation)
    if layout == "tok":
        qq, kk, vv = [t.transpose(1, 2).flatten(2) for t in (q4, k4, v4)]
        op = lambda: m.sana_linear_attention(qq, kk, vv, H, backend="triton")
    else:
        qq, kk, vv = [t.transpose(2, 3) for t in (q4, k4, v4)]
        op = lambda: m.sana_multiscale_linear_attention(qq, kk, vv, backend="triton")
    t = do_bench(op, warmup=5, rep=25)
    rec(case=name, shipped_op_us=round(t * 1e3, 1), pct_of_copy=round(100 * 4 * tensor_bytes / t / 1e9 / COPY, 1))
    if layout == "tok":
        def stock():  # diffusers SanaLinearAttnProcessor2_0 math after the projections
            qs = torch.relu(qq.transpose(1, 2).unflatten(1, (H, -1))).float()
            ks_ = torch.relu(kk.transpose(1, 2).unflatten(1, (H, -1)).transpose(2, 3)).float()
            vs = torch.nn.functional.pad(vv.transpose(1, 2).unflatten(1, (H, -1)).float(), (0, 0, 0, 1), value=1.0)
            hs = (vs @ ks_) @ qs
            return (hs[:, :, :-1] / (hs[:, :, -1:] + 1e-15)).flatten(1, 2).transpose(1, 2).to(qq.dtype)
        t = do_bench(stock, warmup=5, rep=25)
        rec(case=name, stock_us=round(t * 1e3, 1))

KV_CFGS = [(64, 4, 3), (128, 4, 3), (128, 4, 4), (128, 8, 3), (256, 8, 3), (256, 4, 2)]
OUT_CFGS = [(64, 4, 3), (128, 4, 3), (128, 4, 2), (128, 8, 3), (256, 8, 3), (256, 8, 2)]
CASES = [
    (("sana16k_bf16", "tok", 1, 70, 16384, 32, torch.bfloat16), KV_CFGS, OUT_CFGS, (2, 4, 8), 115),
    (("dcae16k_bf16", "cf", 1, 64, 16384, 32, torch.bfloat16), [(128, 4, 3), (256, 8, 3), (128, 8, 3), (64, 4, 3)],
     [(128, 4, 3), (256, 8, 3), (128, 8, 3), (64, 4, 3)], (4, 8), 145),
    (("sana4k_bf16", "tok", 1, 70, 4096, 32, torch.bfloat16), [(128, 4, 3), (64, 4, 3)], [(128, 4, 3), (64, 4, 3)], (4, 8), 155),
    (("d112_16k_bf16", "tok", 1, 20, 16384, 112, torch.bfloat16), [(64, 8, 2), (32, 4, 3), (64, 4, 3)],
     [(64, 8, 2), (32, 4, 3), (64, 4, 3)], (4,), 168),
    (("dcae16k_fp32", "cf", 1, 64, 16384, 32, torch.float32), [(128, 4, 3), (64, 4, 3)], [(128, 4, 3), (64, 4, 3)], (4,), 178),
    (("sana16k_fp16", "tok", 1, 70, 16384, 32, torch.float16), [(128, 4, 3)], [(128, 4, 3)], (4,), 186),
]
for args in CASES:
    try:
        sweep(*args)
    except Exception as e:
        rec(case=args[0][0], error=repr(e)[:300])
print("done", time.time() - T0)
