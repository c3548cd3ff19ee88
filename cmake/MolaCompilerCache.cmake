# ccache on both compilers when present: a 2-core machine rebuilding LibTorch
# translation units is the slowest part of CI. The precompiled header needs the
# sloppiness settings below or ccache refuses to cache.
find_program(MOLA_CCACHE ccache)
if(MOLA_CCACHE)
  set(CMAKE_CXX_COMPILER_LAUNCHER "${CMAKE_COMMAND};-E;env;CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime;CCACHE_BASEDIR=${PROJECT_SOURCE_DIR};CCACHE_NOHASHDIR=1;${MOLA_CCACHE}")
  set(CMAKE_CUDA_COMPILER_LAUNCHER "${MOLA_CCACHE}")
endif()
