#!/usr/bin/env bash
# One command for a fresh H100/H200 (no network), from the repository root or anywhere:
#     bash benchmarks/gpu_check.sh [--dry-run] [--suite kernels|dcgen|e2e|all | --sections a,b,...] [--quick]
#                                  [--budget-s N] [--hard-limit-s N]
# Phases: install the carried diffusers wheel (.whl/) -> build _C for the local arch -> torch sees a GPU (else that
# phase fails and neither the tests nor the suite run; not in a dry run) -> pytest -m gpu (dcgen: the
# GPU tests of the ops it measures; kernels: the others; all: every one; e2e: none) -> benchmark suite
# (benchmarks/run.py --suite ...) -> perf-regression check against each baseline of this GPU model in
# benchmarks/results/ (baseline-<gpu>.json, baseline-<gpu>-<suite>.json; benchmarks/compare.py; skipped with a
# note when there is none). Writes
# ${OUT:-benchmarks/results}/gpu_check-<gpu>-<date>.json and .log (plus -e2e.md and -e2e.png for the e2e suite),
# copied to benchmarks/results/ too when $OUT is set (not in a dry run); the JSON holds the phases even when the
# suite wrote nothing.
# Whole run aimed at 8 min (--budget-s): every phase has a timeout, the suite is told what is left and records a
# section that would not fit as skipped. Two floors may push the call past the budget when install and build are
# slow (the GPU tests get at least 150 s, the suite 120 s; the phases' timeouts sum to install 120 + configure 90 +
# build 180 + tests >= 150 + suite >= 120 + 60 per baseline compared), but never past --hard-limit-s (default: the
# budget + 90 s, 570 s for the default budget, inside a 600 s device call): each phase's timeout is cut to what is
# left before it, 15 s kept for the JSON, and a phase with under 10 s left is skipped and counts as failed. The JSON
# (and the e2e table and chart) is rewritten after every section, so a suite killed at its timeout keeps what it
# measured, and gets every phase's status at the end (`gpu_check.phases`, `gpu_check.failed_phases`). A failing
# phase is recorded and the next one still runs; the exit status is non-zero if any phase failed (a tracked metric
# regressing by more than 10% against the baseline fails its phase).
# Suites, one call each (estimates for an H100, from the 2026-11-27 anchors and run; nothing newer has run yet):
#   kernels (default)  pytest -m gpu (not the dcgen tests), ceilings, op benchmarks, FLUX/SANA steps, DC-AE decode,
#                      SANA torch.compile (~6-7 min).
#   dcgen              pytest -m gpu of the patch-embedding / FP8 / NVFP4 tests (<= 3 min cap), ceilings,
#                      patch_embed (fused (un)packing vs the bare GEMM, fwd and fwd+bwd; ~1 min, mostly Triton JIT)
#                      and quant_linear (FP8 / NVFP4 linears at FLUX shapes, FLUX-12B step stock / patched / fp8 /
#                      nvfp4: ~2 min, the NVFP4 variant quantizes 418 weights first): ~4-6 min with ~30 s install
#                      + build.
#   e2e                no pytest; per-image latency FLUX.1-Krea vs DC-Gen-FLUX and SANA-1.6B vs DC-Gen-SANA at
#                      1K/2K/4K (stock, patched), the RTX 5090 projection, then torch.compile of the transformer
#                      where the budget allows (DC-Gen-FLUX 4K first). ~30 s install + build, ~3 min eager (a
#                      65536-token FLUX step ~7 s, the FLUX VAE 4K decode ~3.7 s), ~15 s projection, ~2.3 min for the
#                      FLUX compile (126 s) and ~1 min for the SANA-1.6B 4K one; the other compiles are skipped for
#                      time: ~7 min in all.
#   all                all three, in that order; on a GPU the later sections are skipped when the budget runs out.
# --sections a,b,...: those benchmark sections of run.py (in its order) instead of a suite, with every GPU test and a
#   comparison against each baseline of this GPU model: one call for what several suites' open items need.
# pytest runs on 4 workers (pytest-xdist, one file per worker: the tests are bound by Triton's JIT on the CPU)
# when pytest-xdist works here (the carried wheels; probed first); else serially.
# --budget-s N: the whole run's seconds instead of 480 (two suites in one device call: e.g. dcgen 290 + e2e 240).
# --hard-limit-s N: the seconds no phase may run past (default budget + 90; leave room for what the call runs after).
# --quick: e2e at 1K only. --dry-run (or DCGEN_DRY_RUN=1): the same phases, with the suite in tiny CPU mode;
# works without a GPU.
set -euo pipefail
if ((BASH_VERSINFO[0] < 5)); then  # EPOCHSECONDS / EPOCHREALTIME
  echo "gpu_check.sh needs bash >= 5, this is $BASH_VERSION" >&2
  exit 2
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

DRY_RUN=${DCGEN_DRY_RUN:-0}
SUITE=kernels
QUICK=0
BUDGET_S=480
HARD_LIMIT_S=
SECTIONS=
usage() {
  echo "usage: $0 [--dry-run] [--suite kernels|dcgen|e2e|all | --sections a,b,...] [--quick] [--budget-s N]" \
    "[--hard-limit-s N]" >&2
  exit 2
}
while (($#)); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --quick) QUICK=1 ;;
    --suite)
      (($# >= 2)) || usage
      SUITE=$2
      shift ;;
    --suite=*) SUITE=${1#--suite=} ;;
    --sections)
      (($# >= 2)) || usage
      SECTIONS=$2
      shift ;;
    --sections=*) SECTIONS=${1#--sections=} ;;
    --budget-s)
      (($# >= 2)) || usage
      BUDGET_S=$2
      shift ;;
    --hard-limit-s)
      (($# >= 2)) || usage
      HARD_LIMIT_S=$2
      shift ;;
    *) usage ;;
  esac
  shift
done
case $SUITE in kernels|dcgen|e2e|all) ;; *) usage ;; esac
[[ $BUDGET_S =~ ^[0-9]+$ ]] || { echo "--budget-s: expected whole seconds, got '$BUDGET_S'" >&2; exit 2; }
HARD_LIMIT_S=${HARD_LIMIT_S:-$((BUDGET_S + 90))}
[[ $HARD_LIMIT_S =~ ^[0-9]+$ ]] || { echo "--hard-limit-s: expected whole seconds, got '$HARD_LIMIT_S'" >&2; exit 2; }

PY=${PYTHON:-python3}
if [[ -n $SECTIONS ]]; then  # a misspelt name fails here, not after the tests
  "$PY" -c 'import sys; from benchmarks.run import select_sections; select_sections("all", sys.argv[1])' "$SECTIONS"
fi

# Real-size suite on an H100: ~40 s FLUX (ceilings, attention, steps); SANA ops ~30 s, SANA steps ~20 s, DC-AE 4K
# decodes ~25 s, torch.compile of the SANA step ~2 x 45 s (last); plus model builds and Triton JIT. The suite is
# also told what is left (--budget-s) and skips a section that would not fit rather than being killed mid-way.
SUITE_RESERVE_S=300
# The dcgen suite's benchmarks need ~1.5-2 min; its pytest phase runs only the GPU tests of the ops it measures,
# the quick ones first (the patch-embedding tests compile the most Triton kernels).
DCGEN_SUITE_RESERVE_S=150
# A killed test phase reports nothing, while the suite skips what does not fit: the GPU tests get at least this
# (all of them took 78 s on 4 xdist workers on an H100, 2026-11-27; 60 s cut them off at 58% that day).
PYTEST_MIN_S=150
HARD_LIMIT_MARGIN_S=15   # kept after the last phase: the comparisons' skips and the JSON with the phases
DCGEN_TESTS=(tests/test_cuda_graph.py tests/test_fp8_linear.py tests/test_nvfp4_quantize.py tests/test_nvfp4_gemm.py
             tests/test_quantize.py tests/test_nunchaku_interop.py tests/test_patch_latents.py tests/test_patch_embed.py)
START=$EPOCHSECONDS
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || true)
SLUG=$(printf '%s' "${GPU_NAME:-no-gpu}" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
[[ $DRY_RUN == 1 ]] && SLUG=dryrun-$SLUG
RESULTS=$ROOT/benchmarks/results
# A dry run's files are no results: they go under the git-ignored build/ unless $OUT says otherwise.
if [[ $DRY_RUN == 1 ]]; then OUT_DIR=${OUT:-$ROOT/build/gpu_check-dry-run}; else OUT_DIR=${OUT:-$RESULTS}; fi
mkdir -p "$OUT_DIR" "$RESULTS"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
BASE=$OUT_DIR/gpu_check-$SLUG-$(date -u +%Y%m%d-%H%M%S)
WORK=$(mktemp -d)
PHASES=$WORK/phases.tsv   # name, status, seconds: read by run.py into the JSON
JUNIT=$WORK/pytest-junit.xml

cuda_arch() {  # e.g. 90a on an H100: the arch-specific 'a' targets carry wgmma/TMA (sm_90 and newer)
  if [[ -n ${DCGEN_CUDA_ARCHS:-} ]]; then echo "$DCGEN_CUDA_ARCHS"; return; fi
  local cap
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .' || true)
  if [[ -z $cap ]]; then echo 90a; return; fi  # no GPU (dry run): build for the H100 target
  if ((cap >= 90)); then echo "${cap}a"; else echo "$cap"; fi
}

record() {  # record NAME STATUS SECONDS
  printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$PHASES"
  echo "=== [$1] $2 in ${3}s (elapsed $((EPOCHSECONDS - START))s of ${BUDGET_S}s)"
}

xdist_works() {  # the plugin loads with this pytest and starts workers (a probe outside the repository, ~2 s)
  printf 'def test_probe():\n    pass\n' >"$WORK/test_xdist_probe.py"
  timeout -k 5 60 "$PY" -m pytest -q -p no:cacheprovider -n 2 "$WORK/test_xdist_probe.py" >/dev/null 2>&1
}

FAILED=()
phase() {  # phase NAME TIMEOUT_S -- CMD...: run with a timeout, time and record it; never fatal; PHASE_RC = its rc
  local name=$1 limit=$2 before_hard_limit
  shift 3
  before_hard_limit=$((HARD_LIMIT_S - (EPOCHSECONDS - START) - HARD_LIMIT_MARGIN_S))
  if ((before_hard_limit < 10)); then
    record "$name" "skipped (${before_hard_limit}s left before --hard-limit-s ${HARD_LIMIT_S})" 0
    FAILED+=("$name")
    PHASE_RC=124
    return
  fi
  ((limit <= before_hard_limit)) || limit=$before_hard_limit
  echo "=== [$name] (timeout ${limit}s) $*"
  local t0=$EPOCHREALTIME rc=0
  timeout -k 10 "$limit" "$@" || rc=$?
  local dt status
  dt=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  case $rc in
    0) status=ok ;;
    124) status="timeout after ${limit}s"; FAILED+=("$name") ;;
    *) if ((rc == 137 && ${dt%.*} >= limit)); then status="timeout after ${limit}s (killed 10 s after the TERM)"
       else status="failed (rc=$rc)"; fi  # 137 before the limit: killed otherwise (e.g. out of memory)
       FAILED+=("$name") ;;
  esac
  record "$name" "$status" "$dt"
  PHASE_RC=$rc
}

main() {
  local what="suite $SUITE"
  [[ -z $SECTIONS ]] || what="sections $SECTIONS"
  echo "gpu_check: $(date -u +%FT%TZ) on $(hostname); $what, quick $QUICK, dry run $DRY_RUN; results: $BASE.json"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null \
    || echo "nvidia-smi: no GPU visible"

  if compgen -G ".whl/*.whl" >/dev/null; then
    phase install_wheels 120 -- "$PY" -m pip install -q --no-index --no-deps --upgrade --target .pysite .whl/*.whl
    export PYTHONPATH=$ROOT/.pysite:$ROOT${PYTHONPATH:+:$PYTHONPATH}
  else
    record install_wheels "skipped (no .whl/*.whl; using the installed diffusers, if any)" 0
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  fi

  if [[ -f CMakeLists.txt ]]; then
    local arch so
    arch=$(cuda_arch)
    echo "building _C for DCGEN_CUDA_ARCHS=$arch"
    # A build directory configured for another copy of the tree makes CMake regenerate into that copy, endlessly.
    if [[ -f build-gpu/CMakeCache.txt ]] && ! grep -qxF "CMAKE_HOME_DIRECTORY:INTERNAL=$(pwd -P)" build-gpu/CMakeCache.txt; then
      echo "build-gpu/ was configured for another source tree: removing it"
      rm -rf build-gpu
    fi
    phase cmake_configure 90 -- cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DDCGEN_CUDA_ARCHS="$arch" -DPython_EXECUTABLE="$(command -v "$PY")" \
      -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)"
    phase cmake_build 180 -- cmake --build build-gpu
    so=$(find build-gpu -name '_C*.so' -print -quit)
    if ((PHASE_RC != 0)); then  # a _C left by an earlier build is not this commit's: run without one
      [[ $DRY_RUN == 1 ]] || rm -f dcgen_kernels/_C*.so  # (a dry run leaves the developer's own build alone)
      record install_extension "skipped (the build failed: no _C from this commit)" 0
    elif [[ $DRY_RUN == 1 ]]; then  # the CPU never runs _C: the developer's own build (all archs) stays
      echo "dry run: built $so, not installed"
    elif [[ -n $so ]]; then
      cp -f "$so" dcgen_kernels/ && echo "installed $so -> dcgen_kernels/"
    else
      record install_extension "failed (no _C*.so under build-gpu/)" 0
      FAILED+=(install_extension)
    fi
  else
    record cmake_build "skipped (no CMakeLists.txt)" 0
  fi

  # A torch that sees no GPU would skip every GPU test and run the suite in tiny CPU mode, both "ok": stop here.
  local no_gpu=
  if [[ $DRY_RUN != 1 ]]; then
    phase cuda_visible 60 -- "$PY" -c 'import sys, torch; n = torch.cuda.device_count()
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees {n} GPU(s)"); sys.exit(0 if n else 1)'
    ((PHASE_RC == 0)) || no_gpu="skipped (torch sees no GPU: the tests would skip, the suite would run tiny on the CPU)"
  fi

  local left hard_left suite_args=(--out "$BASE.json" --phases "$PHASES")
  if [[ -n $SECTIONS ]]; then suite_args+=(--sections "$SECTIONS"); else suite_args+=(--suite "$SUITE"); fi
  if [[ -n $no_gpu ]]; then
    record pytest_gpu "$no_gpu" 0
  elif [[ -z $SECTIONS && $SUITE == e2e ]]; then
    record pytest_gpu "skipped (suite e2e: the benchmark gets the whole call)" 0
  else
    local reserve=$SUITE_RESERVE_S tests=(tests) t parallel=()
    if [[ -z $SECTIONS ]]; then
      case $SUITE in
        dcgen) reserve=$DCGEN_SUITE_RESERVE_S; tests=("${DCGEN_TESTS[@]}") ;;
        kernels) for t in "${DCGEN_TESTS[@]}"; do tests+=("--ignore=$t"); done ;;  # the dcgen suite runs those
      esac
    fi
    if xdist_works; then parallel=(-n 4 --dist loadfile); else echo "pytest-xdist unusable here: tests run serially"; fi
    left=$((BUDGET_S - (EPOCHSECONDS - START) - reserve))
    phase pytest_gpu $((left > PYTEST_MIN_S ? (left < 180 ? left : 180) : PYTEST_MIN_S)) -- \
      "$PY" -m pytest -m gpu -q "${parallel[@]}" "${tests[@]}" --junitxml="$JUNIT"
    suite_args+=(--pytest-junit "$JUNIT")
  fi

  if [[ $DRY_RUN == 1 ]]; then suite_args+=(--tiny); fi
  if [[ $QUICK == 1 ]]; then suite_args+=(--quick); fi
  left=$((BUDGET_S - (EPOCHSECONDS - START) - 15))
  left=$((left > 120 ? left : 120))
  hard_left=$((HARD_LIMIT_S - (EPOCHSECONDS - START) - HARD_LIMIT_MARGIN_S))
  ((left <= hard_left)) || left=$hard_left  # as phase() will cut it
  # The suite's own budget stops 20 s short of the phase timeout: room to write the table and JSON.
  suite_args+=(--budget-s $((left > 20 ? left - 20 : 0)))
  if [[ -n $no_gpu ]]; then
    record suite "$no_gpu" 0
  else
    phase suite "$left" -- "$PY" benchmarks/run.py "${suite_args[@]}"
  fi

  # Every baseline of the GPU model (baseline-<gpu>.json, baseline-<gpu>-<suite>.json): a section's reference may
  # sit in another suite's baseline (the SANA sections' in -dcgen); metrics only in one file are shown, not gated.
  # The suites are named: a glob would take another board's (baseline-nvidia-h200-nvl.json for nvidia-h200).
  local baselines=("$RESULTS"/baseline-"$SLUG".json "$RESULTS"/baseline-"$SLUG"-{kernels,dcgen,e2e,all}.json) baseline
  local compared=0
  if [[ ! -f $BASE.json ]]; then
    record perf_regression_check "skipped (the suite wrote no JSON)" 0
    compared=1
  else
    for baseline in "${baselines[@]}"; do
      [[ -f $baseline ]] || continue
      phase "perf_regression_check vs $(basename "$baseline")" 60 -- "$PY" benchmarks/compare.py "$baseline" "$BASE.json"
      compared=1
    done
  fi
  if ((!compared)); then
    record perf_regression_check "skipped (no baseline for '$SLUG': copy a reviewed result JSON to ${baselines[0]})" 0
  fi

  # The suite recorded the phases before it: add its own and the comparisons'. Without its JSON (it did not run, or
  # died before its first save) write one with the phases and the GPU tests' counts, so they are not lost.
  "$PY" - "$BASE.json" "$PHASES" "$JUNIT" "$GPU_NAME" "${FAILED[@]}" <<'PYEOF' \
    || echo "gpu_check: could not write the phases to $BASE.json"
import json, sys
from pathlib import Path
from benchmarks.run import gpu_check_record
path, phases, junit, gpu, failed = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
if path.exists():
    report = json.loads(path.read_text())
    report.setdefault("gpu_check", {}).update(gpu_check_record(None, phases), failed_phases=failed)
else:
    record = gpu_check_record(junit if Path(junit).exists() else None, phases)
    report = {"mode": "no benchmark results", "environment": {"gpu": gpu or None},
              "gpu_check": {**record, "failed_phases": failed},
              "problems": ["the benchmark suite wrote no results (see gpu_check.phases)"]}
path.write_text(json.dumps(report, indent=1, default=str) + "\n")
PYEOF
  echo "gpu_check: total $((EPOCHSECONDS - START))s; results $BASE.json; log $BASE.log"
  if ((${#FAILED[@]})); then
    echo "gpu_check: FAILED phases: ${FAILED[*]}"
    return 1
  fi
  echo "gpu_check: all phases ok"
}

rc=0
main 2>&1 | tee "$BASE.log" || rc=$?
if [[ -n ${OUT:-} && $OUT_DIR != "$RESULTS" && $DRY_RUN != 1 ]]; then  # a dry run's files are not results
  cp -f "$BASE".* "$BASE"-e2e.* "$RESULTS"/ 2>/dev/null || true
fi
rm -rf "$WORK"
exit "$rc"
