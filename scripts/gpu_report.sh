#!/usr/bin/env bash
# Everything edge-dlm measures on a GPU, in one run, into one markdown report: OUTDIR/gpu_report.md
# (raw logs next to it). Needs a CUDA GPU and the package installed (`make test`'s .venv, or
# `pip install --no-deps -e .` on a machine that already has torch / triton / transformers).
#
#     scripts/gpu_report.sh OUTDIR [--quick]      # --quick: 3B shape and one quant scheme only
#
# Sections: the whole test suite on the GPU; the Triton attention and weight-only matmul kernels
# against SDPA / bf16 GEMMs; `bench --shape 3b|8b` (eager vs CUDA-graph replay per pass width, the
# read floor) in bf16 and int4 / int8 / nf4; the demo model's bench with the kernels on and off and with
# compiled passes (CUDA graphs) on and off; sampled picks (the sampler, and decoding sampled against
# greedy, eager and compiled).
set -u
out=${1:?usage: scripts/gpu_report.sh OUTDIR [--quick]}
quick=${2:-}
mkdir -p "$out"
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
cli="$py -m edge_dlm.cli"
report="$out/gpu_report.md"

section() {  # section TITLE LOGNAME COMMAND...: run it, keep the log, put the command and its tail in the report
    local title=$1 log=$2; shift 2
    local t0=$SECONDS
    "$@" >"$out/$log" 2>&1
    local rc=$?
    { echo "## $title"; echo; echo '```'; echo "\$ $*   # exit $rc, $((SECONDS - t0)) s"; echo '```'; echo
      grep -v '^\s*$' "$out/$log" | grep -E '^\||^NLD|passed|failed|error|Error|^[a-z].*:' | tail -n 60
      echo; } >>"$report"
}

{ echo "# edge-dlm GPU report"; echo
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  echo "- $($py -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}")' 2>&1)"
  echo; } >"$report"

section "Test suite on the GPU" tests.log $py -m pytest -q -p no:cacheprovider -x -rfs tests
section "Compiled passes under a server's load (CUDA graphs, background compiles)" serving.log \
    $py scripts/check_compiled_serving.py --device cuda --requests 60
section "Attention kernel vs SDPA / FlexAttention" kernels.log $py scripts/bench_kernels.py --dtype bfloat16
shapes="3b 8b"; quants="int4 int8 nf4"
[ "$quick" = "--quick" ] && shapes="3b" && quants="int4"
for shape in $shapes; do
    for q in $quants; do
        section "NLD-$shape shape, bf16 vs $q (random weights)" "shape_${shape}_$q.log" \
            $cli bench --shape "$shape" --device cuda --quant "$q" --repeats 20
    done
done
for k in on off; do
    section "Demo model, --kernels $k" "demo_kernels_$k.log" \
        $cli bench --device cuda --kernels "$k" --modes ar diffusion linear-spec quadratic-spec --repeats 3
done
section "NLD-3b shape (2 layers), compiled step functions (CUDA graphs) vs eager" shape_3b_compiled.log \
    $cli bench --shape 3b --layers 2 --device cuda --compile on --kernels off --repeats 20
section "Demo model, compiled vs eager vs onnxruntime (CPU)" demo_compiled_cpu.log \
    $py scripts/bench_compiled.py --rounds 3
for c in on off; do
    section "Demo model on CUDA, --compile $c" "demo_compile_$c.log" \
        $cli bench --device cuda --kernels off --compile "$c" --modes ar diffusion linear-spec quadratic-spec --repeats 3
done
section "Sampled picks on a 131072-token vocabulary (Sampler vs the whole-vocabulary reference)" sampler.log \
    $py scripts/bench_sampler.py --device cuda --rounds 5
section "Sampled vs greedy decoding, eager and compiled (CUDA graphs)" sampled_decode.log \
    $py scripts/bench_sampled_decode.py --device cuda
section "Demo model int4, --kernels on" demo_int4.log \
    $cli bench --device cuda --kernels on --quant int4 --modes ar linear-spec quadratic-spec --repeats 3
echo "report: $report"
