#!/usr/bin/env bash
# llama.cpp's llama-bench with CUDA (sm_90) from the source carried as .whl/llamacpp-cuda-src.tar.xz
# (llama-cpp-python 0.3.36's vendor/llama.cpp), into /tmp/lc/b/bin; for the GPU machine's scripts.
set -e
[ -x /tmp/lc/b/bin/llama-bench ] && { echo "llama-bench already built"; exit 0; }
mkdir -p /tmp/lc
tar xJf .whl/llamacpp-cuda-src.tar.xz -C /tmp/lc
cmake -S /tmp/lc/llama.cpp -B /tmp/lc/b -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
  -DGGML_NATIVE=ON
cmake --build /tmp/lc/b -j 14 --target llama-bench
