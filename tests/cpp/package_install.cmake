# ctest cpp_package_finetune (cmake -P): the installed C++ package works for a
# user's project. Installs the build into a fresh prefix, configures and builds
# examples/cpp/finetune against that prefix only (find_package(mola) must
# resolve there, not to the build tree), runs the program from the source root
# and checks that it trained: the loss it prints fell and the adapter files
# exist; and that docs/cpp.md quotes the program as it is.
#   -DBUILD_DIR= -DSOURCE_DIR= -DWORK_DIR= -DCXX= [-DLAUNCHER=ccache] [-DBUILD_TYPE=Release]
foreach(v BUILD_DIR SOURCE_DIR WORK_DIR CXX)
  if(NOT ${v})
    message(FATAL_ERROR "package_install.cmake: -D${v}= is required")
  endif()
endforeach()
if(NOT BUILD_TYPE)
  set(BUILD_TYPE Release)
endif()

function(run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what} failed (${rc}):\n${out}\n${err}")
  endif()
  set(last_output "${out}${err}" PARENT_SCOPE)
endfunction()

set(prefix ${WORK_DIR}/prefix)
set(example_build ${WORK_DIR}/finetune-build)
set(out ${WORK_DIR}/finetune-out)
# A fresh prefix and output each time; the example's build directory is kept so
# a re-run rebuilds incrementally (ccache covers a fresh one: the paths are fixed).
file(REMOVE_RECURSE ${prefix} ${out})

string(TIMESTAMP t0 "%s")
run("cmake --install" ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix} --component cpp)
foreach(f include/mola/mola.h lib/cmake/mola/molaConfig.cmake lib/cmake/mola/molaConfigVersion.cmake
          lib/cmake/mola/molaTargets.cmake)
  if(NOT EXISTS ${prefix}/${f})
    message(FATAL_ERROR "the install has no ${f}")
  endif()
endforeach()
file(GLOB libmola ${prefix}/lib*/libmola.so)
if(NOT libmola)
  message(FATAL_ERROR "the install has no lib/libmola.so")
endif()
# SentencePiece is private to libmola: the exported target must not name it.
file(READ ${prefix}/lib/cmake/mola/molaTargets.cmake targets)
string(FIND "${targets}" "${BUILD_DIR}" in_build)
string(FIND "${targets}" "${SOURCE_DIR}/include" in_source)
if(targets MATCHES "[Ss]entence[Pp]iece" OR NOT in_build EQUAL -1 OR NOT in_source EQUAL -1)
  message(FATAL_ERROR "molaTargets.cmake refers to SentencePiece or to the build/source tree:\n${targets}")
endif()

set(configure ${CMAKE_COMMAND} -S ${SOURCE_DIR}/examples/cpp/finetune -B ${example_build}
    -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_BUILD_TYPE=${BUILD_TYPE}
    -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON)
if(LAUNCHER)
  list(APPEND configure -DCMAKE_CXX_COMPILER_LAUNCHER=${LAUNCHER})
endif()
run("configuring examples/cpp/finetune against ${prefix}" ${configure})
file(STRINGS ${example_build}/CMakeCache.txt mola_dir REGEX "^mola_DIR:")
if(NOT mola_dir STREQUAL "mola_DIR:PATH=${prefix}/lib/cmake/mola")
  message(FATAL_ERROR "find_package(mola) resolved to '${mola_dir}', not the install in ${prefix}")
endif()
run("building examples/cpp/finetune" ${CMAKE_COMMAND} --build ${example_build})
string(TIMESTAMP t1 "%s")

run("running finetune" ${CMAKE_COMMAND} -E chdir ${SOURCE_DIR} ${example_build}/finetune ${out})
string(TIMESTAMP t2 "%s")
message("${last_output}")
if(NOT last_output MATCHES "loss on the training rows: ([0-9.eE+-]+) -> ([0-9.eE+-]+) after ([0-9]+) steps")
  message(FATAL_ERROR "finetune printed no loss line")
endif()
set(before ${CMAKE_MATCH_1})
set(after ${CMAKE_MATCH_2})
if(NOT after LESS before OR NOT CMAKE_MATCH_3 GREATER 0)
  message(FATAL_ERROR "finetune did not train: loss ${before} -> ${after} after ${CMAKE_MATCH_3} steps")
endif()
foreach(f adapter/adapter_config.json adapter/adapter_model.safetensors metrics.jsonl)
  if(NOT EXISTS ${out}/${f})
    message(FATAL_ERROR "finetune wrote no ${out}/${f}")
  endif()
endforeach()
# docs/cpp.md quotes the program exactly.
file(READ ${SOURCE_DIR}/examples/cpp/finetune/finetune.cpp program)
file(READ ${SOURCE_DIR}/docs/cpp.md page)
string(FIND "${page}" "${program}" quoted)
if(quoted EQUAL -1)
  message(FATAL_ERROR "docs/cpp.md does not quote examples/cpp/finetune/finetune.cpp exactly; paste it again")
endif()
math(EXPR install_build "${t1} - ${t0}")
math(EXPR run_s "${t2} - ${t1}")
message("cpp_package_finetune: install + configure + build ${install_build} s, run ${run_s} s; loss ${before} -> ${after}")
