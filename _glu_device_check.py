"""Temporary device check for glumbconv (deleted after the run)."""
import json, os, sys
import torch, torch.nn.functional as F, triton
from triton.testing import do_bench
from dcgen_kernels.ops.glumbconv import _launch_depthwise_glu, _block_config, glumbconv, glumbconv_reference

torch.manual_seed(0)
dev = "cuda"
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
res = {"device": torch.cuda.get_device_name()}

def dw_ref(pre, H, W, dw, db):
    h = F.silu(pre.float()).unflatten(0, (-1, H, W)).permute(0, 3, 1, 2)
    h = F.conv2d(h, dw.float(), db.float(), padding=1, groups=h.shape[1])
    v, g = h.chunk(2, 1)
    return (v * F.silu(g)).flatten(2).transpose(1, 2).flatten(0, 1)

def rel(a, b): return ((a.double() - b.double()).norm() / b.double().norm()).item()
torch.backends.cudnn.allow_tf32 = False

tiles = [(16, 64, 8), (8, 64, 4), (32, 32, 8), (8, 128, 8), (16, 32, 4), (4, 64, 2), (32, 64, 8), (16, 64, 4), (16, 128, 8)]
configs = [dict(BLOCK_W=bw, BLOCK_C=bc, num_warps=nw, rows_per_program=r) for bw, bc, nw in tiles for r in (8, 16, 32)]
# correctness of every config at odd sizes
H, W, hid = 45, 37, 200
pre = torch.randn(2 * H * W, 2 * hid, device=dev, dtype=torch.bfloat16)
dw = torch.randn(2 * hid, 1, 3, 3, device=dev, dtype=torch.bfloat16) / 3
db = torch.randn(2 * hid, device=dev, dtype=torch.bfloat16)
exp = dw_ref(pre, H, W, dw, db)
bad = []
for cfg in configs:
    out = torch.full((2 * H * W, hid), float("nan"), device=dev, dtype=torch.bfloat16)
    _launch_depthwise_glu(pre, H, W, dw, db, out, cfg)
    e = rel(out, exp)
    if not e < 5e-3: bad.append((cfg, e))
print("config correctness failures:", bad, flush=True)

shapes = {"sana64_b2": (2, 64, 64, 5600), "sana128_b2": (2, 128, 128, 5600), "dcae1024_256sq": (1, 256, 256, 4096), "dcae512_512sq": (1, 512, 512, 2048)}
sweep = {}
for name, (B, H, W, hid) in shapes.items():
    pre = torch.randn(B * H * W, 2 * hid, device=dev, dtype=torch.bfloat16)
    dw = torch.randn(2 * hid, 1, 3, 3, device=dev, dtype=torch.bfloat16) / 3
    db = torch.randn(2 * hid, device=dev, dtype=torch.bfloat16)
    out = torch.empty(B * H * W, hid, device=dev, dtype=torch.bfloat16)
    nbytes = pre.numel() * 2 + out.numel() * 2
    rows = []
    for cfg in configs + [None]:
        ms = do_bench(lambda: _launch_depthwise_glu(pre, H, W, dw, db, out, cfg), warmup=10, rep=40)
        rows.append((ms, str(cfg or ("default", _block_config(B, H, W, hid)))))
    rows.sort()
    # stock depthwise+glu on channels_last bf16: silu, depthwise conv, chunk, gating
    x_cl = pre.view(B, H, W, 2 * hid).permute(0, 3, 1, 2)
    def stock_mid():
        h = F.conv2d(F.silu(x_cl), dw, db, padding=1, groups=2 * hid)
        v, g = h.chunk(2, 1)
        return v * F.silu(g)
    stock_ms = do_bench(stock_mid, warmup=10, rep=40)
    sweep[name] = dict(stock_mid_ms=stock_ms, best=[(ms, c, nbytes / ms / 1e9) for ms, c in rows[:5]],
                       default=[(ms, c, nbytes / ms / 1e9) for ms, c in rows if c.startswith("('default'")])
    print(name, "stock silu+dw+glu %.3f ms" % stock_ms, flush=True)
    for ms, c in rows[:6]:
        print("   %.4f ms  %.0f GB/s  %s" % (ms, nbytes / ms / 1e9, c))
    print("   default:", [(round(ms, 4), round(nbytes / ms / 1e9)) for ms, c in rows if c.startswith("('default'")], flush=True)
    del pre, out
res["sweep"] = sweep

def stock(x, H, W, iw, ib, dw, db, pw):
    h = x.unflatten(1, (H, W)).permute(0, 3, 1, 2)
    h = F.silu(F.conv2d(h, iw, ib))
    h = F.conv2d(h, dw, db, padding=1, groups=h.shape[1])
    a, g = h.chunk(2, dim=1)
    h = F.conv2d(a * F.silu(g), pw)
    return h.flatten(2, 3).permute(0, 2, 1)

full = {}
for name, (B, H, W, C, hid) in {"sana64_b2": (2, 64, 64, 2240, 5600), "sana128_b2": (2, 128, 128, 2240, 5600),
                                "sana64_b1": (1, 64, 64, 2240, 5600), "dcae1024_256sq": (1, 256, 256, 1024, 4096),
                                "dcae512_512sq": (1, 512, 512, 512, 2048)}.items():
    N = H * W
    ws = [torch.randn(s, device=dev, dtype=torch.bfloat16) / f ** 0.5 for s, f in
          [((2 * hid, C, 1, 1), C), ((2 * hid,), 1), ((2 * hid, 1, 3, 3), 3), ((2 * hid,), 1), ((C, hid, 1, 1), hid)]]
    x = torch.randn(B, N, C, device=dev, dtype=torch.bfloat16)
    flops = 2 * B * N * C * 2 * hid + 2 * B * N * hid * C + 2 * 9 * B * N * 2 * hid
    ours = do_bench(lambda: glumbconv(x, H, W, *ws, backend="triton"), warmup=10, rep=50)
    st = do_bench(lambda: stock(x, H, W, *ws), warmup=10, rep=50)
    g1 = do_bench(lambda: torch.addmm(ws[1], x.view(B * N, C), ws[0].view(2 * hid, C).t()), warmup=10, rep=50)
    g2in = torch.randn(B * N, hid, device=dev, dtype=torch.bfloat16)
    g2 = do_bench(lambda: torch.mm(g2in, ws[4].view(C, hid).t()), warmup=10, rep=50)
    err = rel(glumbconv(x, H, W, *ws, backend="triton"), glumbconv_reference(x, H, W, *ws)) if B * N * hid <= 2 * 4096 * 5600 else None
    err_stock = rel(stock(x, H, W, *ws), glumbconv_reference(x, H, W, *ws)) if err is not None else None
    full[name] = dict(ours_ms=ours, stock_ms=st, gemm1_ms=g1, gemm2_ms=g2, ours_tflops=flops / ours / 1e9,
                      stock_tflops=flops / st / 1e9, speedup=st / ours, rel_err_ours=err, rel_err_stock=err_stock)
    print(name, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in full[name].items()}, flush=True)
    del x, ws, g2in
    torch.cuda.empty_cache()
res["full"] = full
if os.environ.get("OUT"):
    json.dump(res, open(os.path.join(os.environ["OUT"], "glumbconv_device.json"), "w"), indent=1)
