#!/usr/bin/env bash
# One phase of a GPU session on a device machine (docs/gpu.md). Run from the repository root, with .whl/
# carried (bench/gpu/fetch_wheels.sh). Each phase stops within 7 minutes, so all three fit a session's
# 30 minutes of device time with a machine start before each. Run them in this order:
#
#   bench/gpu/session.sh traces   # issue 5 and 7 latency: forecast_latency, sbm_quantformer_latency, sbm_scaling
#   bench/gpu/session.sh video    # issue 6 latency: the video UNet at paper width on 512 x 288 x 72
#   bench/gpu/session.sh check    # environment report, then the whole test suite with CUDA visible
#   bench/gpu/session.sh probe    # profiles, when a number needs explaining (bench/gpu/probe.py)
#   bench/gpu/session.sh install  # only the installs every phase starts with, and where loopcast comes from
#   bench/gpu/session.sh PHASE --quick   # the same commands as smoke runs (any machine; writes no results)
#
# Logs and the result JSON files written by the phase go to $OUT when it is set (the device tool's
# return folder), else to bench/results/gpu-out/.
#
# The carried wheels and the project itself are installed into $SITE (default /tmp/site), which goes
# first on PYTHONPATH. The repository cannot be imported in place: its folders are mapped into the one
# package `loopcast` (pyproject.toml), and its loopcast/ folder alone lacks the sub-packages. So pytest
# runs as `python -P -m pytest` (-P: the cwd, i.e. that folder, stays off sys.path), and bench scripts
# as `python bench/x.py` (sys.path gets bench/, where their sibling modules are). PY and SITE may be
# set for a dry run elsewhere, e.g. PY=<a python without loopcast> SITE=$(mktemp -d) PYTHONPATH=<its deps>.
set -uo pipefail
phase=${1:?usage: bench/gpu/session.sh check|traces|video|probe|install [--quick]}
quick=${2:-}
cd "$(dirname "$0")/../.."
py=${PY:-python3}
[ -z "${PY:-}" ] && [ -x .venv/bin/python ] && [ -z "${OUT:-}" ] && py=.venv/bin/python
site=${SITE:-/tmp/site}
out=${OUT:-bench/results/gpu-out}
mkdir -p "$out"
log="$out/$phase.log"
: > "$log"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "wheel install failed" | tee -a "$log"; exit 1; }
fi
# the project: a wheel built from this tree with the image's setuptools, in a fresh build directory
# (setuptools would otherwise reuse the stale files of an earlier build/)
build=$(mktemp -d)
printf '[build]\nbuild_base = %s\n' "$build/build" > "$build/setup.cfg"
DIST_EXTRA_CONFIG="$build/setup.cfg" "$py" -m pip install -q --no-deps --no-build-isolation --no-index --no-compile \
    --no-cache-dir --upgrade --target "$site" . > "$build/pip.log" 2>&1 \
  || { cat "$build/pip.log" | tee -a "$log"; echo "project install failed" | tee -a "$log"; exit 1; }
rm -rf "$build"
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
threads=$(( $(nproc) / 2 )); [ "$threads" -lt 1 ] && threads=1
started=$(date +%s)

step() {  # step SECONDS CMD...: run with a time limit, tee'd into the log, never stopping the phase
  local limit=$1; shift
  echo "+ [$(( $(date +%s) - started )) s] timeout $limit $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "= exit ${PIPESTATUS[0]}" | tee -a "$log"
}

q() { [ "$quick" = "--quick" ] && echo "$1" || echo "$2"; }  # q QUICK_ARGS FULL_ARGS

case $phase in
  check)
    step 30 nvidia-smi
    step 60 "$py" -c "import torch, onnxruntime as ort, numpy
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')
print('onnxruntime', ort.__version__, ort.get_available_providers(), 'numpy', numpy.__version__)"
    # the CUDA-only tests first (they are the point of the phase), then the whole suite
    step "$(q 120 150)" "$py" -P -m pytest -q -p no:cacheprovider -rs -k "cuda or gpu or device" \
      tests/test_e2e.py tests/offline_training tests/realtime/test_video_forecast.py tests/realtime/test_runtimes.py \
      tests/realtime/test_preprocess.py tests/realtime/test_dff_torch.py tests/models/test_video_unet.py
    [ "$quick" = "--quick" ] || step 250 "$py" -P -m pytest -q -p no:cacheprovider -x
    ;;
  traces)
    step "$(q 200 250)" "$py" bench/forecast_latency.py --threads "$threads" \
      $(q "--quick" "--devices cuda --frames 200 --warmup 20 --budget-s 10 --name forecast-latency-cuda")
    step "$(q 200 100)" "$py" bench/sbm_quantformer_latency.py --threads "$threads" \
      $(q "--quick" "--devices cuda --frames 50 --warmup 5 --budget-s 20 --name sbm-quantformer-latency-cuda")
    step "$(q 200 100)" "$py" bench/sbm_scaling.py --threads "$threads" \
      $(q "--quick" "--devices cuda --repeats 10 --budget-s 10 --timeout-s 45 --name sbm-scaling-cuda")
    ;;
  video)   # one warm-up frame: a 32-lead frame of the paper's width takes 11-35 s on an H100;
           # engine-torch-bf16 is the loop's own path (the exported program, traces reduced on the GPU)
    step "$(q 300 400)" "$py" bench/video_latency.py --threads "$threads" \
      $(q "--quick" "--grids zapbench-ds4 --models paper --devices cuda --runtimes torch-bf16,torch-bf16-graph,torch-bf16-graph-cl,engine-torch-bf16,torch,reduce --frames 20 --warmup 1 --lead-batch 2 --budget-s 10 --name video-latency-cuda")
    ;;
  probe)   # where the paper UNet's forward time goes (torch.profiler) and the torch runtime's trace path;
           # probe.py imports bench/'s modules (forecast_latency, trace_windows)
    step 200 env PYTHONPATH="$PYTHONPATH:$PWD/bench" "$py" bench/gpu/probe.py video
    step 100 env PYTHONPATH="$PYTHONPATH:$PWD/bench" "$py" bench/gpu/probe.py trace
    ;;
  install)
    step 60 "$py" -P -c "import loopcast, loopcast.realtime.pipeline, loopcast.settings as s
print('loopcast from', loopcast.__file__, '- default config', s.DEFAULT_CONFIG)"
    ;;
  *)
    echo "unknown phase $phase: check, traces, video, probe or install" >&2; exit 2 ;;
esac

if [ "$quick" != "--quick" ]; then   # the result files this phase wrote travel back
  find bench/results -maxdepth 1 -name "*.json" -newermt "@$started" -exec cp {} "$out"/ \;
fi
echo "phase $phase done in $(( $(date +%s) - started )) s; in $out: $(ls "$out" | tr '\n' ' ')" | tee -a "$log"
