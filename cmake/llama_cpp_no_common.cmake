# Included right after llama.cpp's project() when llama-cpp-python is built (`make install`, through
# -DCMAKE_PROJECT_llama.cpp_INCLUDE). llama-cpp-python forces llama.cpp's "common" library on (a cache variable set
# with FORCE), but its Python bindings load only libllama and libggml*: common (argument parsing, chat templates,
# JSON schemas) was half the compile time of the wheel. A normal variable of the same name shadows the cache entry
# in llama.cpp's directory, so llama.cpp neither builds nor installs it.
set(LLAMA_BUILD_COMMON OFF)
