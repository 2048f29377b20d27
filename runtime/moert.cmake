# libmoert: the runtime that every moec-built binary links (a static library,
# so a built model is one self-contained executable). The compiler links
# placement.c and status.c from here too (compiler/CMakeLists.txt).

# The kernel templates (templates/*.cu), embedded as byte arrays for the cuda
# backend, which compiles them with NVRTC at start (templates/embed.cmake).
set(MOERT_TEMPLATE_DIR ${CMAKE_SOURCE_DIR}/templates)
set(MOERT_TEMPLATES common.cuh gating.cu dispatch.cu act.cu norm.cu loss.cu optim.cu bf16.cu rng.cu attention.cu)
list(TRANSFORM MOERT_TEMPLATES PREPEND ${MOERT_TEMPLATE_DIR}/ OUTPUT_VARIABLE MOERT_TEMPLATE_PATHS)
string(REPLACE ";" ":" MOERT_TEMPLATE_ARG "${MOERT_TEMPLATES}")
add_custom_command(
  OUTPUT ${CMAKE_CURRENT_BINARY_DIR}/moert_templates.c
  COMMAND ${CMAKE_COMMAND} -DDIR=${MOERT_TEMPLATE_DIR} -DFILES=${MOERT_TEMPLATE_ARG}
          -DOUT=${CMAKE_CURRENT_BINARY_DIR}/moert_templates.c -P ${MOERT_TEMPLATE_DIR}/embed.cmake
  DEPENDS ${MOERT_TEMPLATE_PATHS} ${MOERT_TEMPLATE_DIR}/embed.cmake
  COMMENT "Embedding the kernel templates (moert_templates.c)")

# An object library: libmoert.a holds them, and moec too (compiler/emit_cuda.c
# writes them into kernels.cu).
add_library(moert_templates OBJECT ${CMAKE_CURRENT_BINARY_DIR}/moert_templates.c)

# The layer kinds' descriptors (layer.h): the runtime's whole; the compiler
# compiles the same files without their executor part (compiler/CMakeLists.txt).
# A new kind's file is found here, not listed.
file(GLOB MOERT_LAYER_KIND_PATHS CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/layers/*.c)
set(MOERT_LAYER_PATHS ${CMAKE_CURRENT_SOURCE_DIR}/layer.c ${MOERT_LAYER_KIND_PATHS})
set(MOERT_LAYER_SOURCES ${MOERT_LAYER_PATHS})
set(MOERT_LAYER_PATHS ${MOERT_LAYER_PATHS} PARENT_SCOPE)
add_library(moert STATIC
  ${MOERT_LAYER_SOURCES}
  status.c cpu_ops.c cpu_ops_typed.c rng.c ${MOERT_CKPT_SOURCES} placement.c cost.c calibrate.c backend_cpu.c comm_self.c comm_staged.c moe.c
  select.c trace.c data.c step.c ckpt_io.c flags.c testing.c run.c driver.c comm_mpi.c comm_nccl.c
  backend_cuda.c cuda_lib.c cuda_nvrtc.c cuda_blas.c cuda_graphs.c
  $<TARGET_OBJECTS:moert_templates>)
target_include_directories(moert PUBLIC ${CMAKE_CURRENT_SOURCE_DIR})
# The cuda backend (backend_cuda.c and its cuda_*.c) opens the driver, NVRTC
# and cuBLAS with dlopen (cuda_lib.c): their headers at build time (for the
# types), nothing CUDA at link time, no GPU needed. Without the headers the
# files compile to stubs that say the backend is not built.
find_path(MOEC_CUDA_INCLUDE cuda.h
  HINTS $ENV{CUDA_HOME}/include $ENV{CUDA_PATH}/include /usr/local/cuda/include)
if(MOEC_CUDA_INCLUDE AND EXISTS ${MOEC_CUDA_INCLUDE}/nvrtc.h AND EXISTS ${MOEC_CUDA_INCLUDE}/cublas_v2.h)
  message(STATUS "cuda backend: headers in ${MOEC_CUDA_INCLUDE} (libraries opened at run time)")
  target_include_directories(moert SYSTEM PRIVATE ${MOEC_CUDA_INCLUDE})
  target_compile_definitions(moert PRIVATE MOERT_HAVE_CUDA_HEADERS)
else()
  message(STATUS "cuda backend: cuda.h, nvrtc.h or cublas_v2.h not found; built without it")
endif()
# trace.c: NVTX ranges through the header-only NVTX3 (it loads an injection
# library only under Nsight); without the header they compile to nothing.
find_path(MOEC_NVTX_INCLUDE nvtx3/nvToolsExt.h
  HINTS ${MOEC_CUDA_INCLUDE} $ENV{CUDA_HOME}/include $ENV{CUDA_PATH}/include /usr/local/cuda/include)
if(MOEC_NVTX_INCLUDE)
  message(STATUS "NVTX: nvtx3 headers in ${MOEC_NVTX_INCLUDE}")
  target_include_directories(moert SYSTEM PRIVATE ${MOEC_NVTX_INCLUDE})
  target_compile_definitions(moert PRIVATE MOERT_HAVE_NVTX)
else()
  message(STATUS "NVTX: nvtx3/nvToolsExt.h not found; no NVTX ranges")
endif()
# comm_nccl.c opens libnccl.so.2 with dlopen the same way (and the driver
# through cuda_lib.c): nccl.h (and the CUDA headers it includes) at build
# time, nothing NCCL at link time. The
# decision is the interface target moert_nccl_headers (MOERT_HAVE_NCCL_HEADERS
# and the include folders), so other code that calls NCCL by dlopen
# (bench/gpu/a2a_bench.c) is built with NCCL exactly where the runtime is.
find_path(MOEC_NCCL_INCLUDE nccl.h
  HINTS $ENV{NCCL_HOME}/include $ENV{NCCL_ROOT}/include ${MOEC_CUDA_INCLUDE} /usr/local/include /usr/include)
add_library(moert_nccl_headers INTERFACE)
if(MOEC_CUDA_INCLUDE AND MOEC_NCCL_INCLUDE AND EXISTS ${MOEC_CUDA_INCLUDE}/cuda_runtime.h)
  message(STATUS "nccl comm: nccl.h in ${MOEC_NCCL_INCLUDE} (libnccl.so.2 opened at run time)")
  target_include_directories(moert_nccl_headers SYSTEM INTERFACE ${MOEC_NCCL_INCLUDE} ${MOEC_CUDA_INCLUDE})
  target_compile_definitions(moert_nccl_headers INTERFACE MOERT_HAVE_NCCL_HEADERS)
else()
  message(STATUS "nccl comm: nccl.h or the CUDA headers not found; built without it")
endif()
target_link_libraries(moert PRIVATE moert_nccl_headers)
# The checkpoint code's libxxhash and jansson (ckpt_libs.cmake): by their full
# paths on the link line of built binaries too, wherever they were found.
target_link_libraries(moert PUBLIC m ${CMAKE_DL_LIBS} moert::xxhash moert::jansson)
set(MOERT_LINK_LIBS "${MOERT_CKPT_LINK_LIBS};-lm;-ldl")
if(MOEC_CBLAS AND CBLAS_INCLUDE AND OPENBLAS_LIB)
  target_include_directories(moert SYSTEM PRIVATE ${CBLAS_INCLUDE})
  target_compile_definitions(moert PRIVATE MOERT_HAVE_CBLAS)
  target_link_libraries(moert PUBLIC ${OPENBLAS_LIB})
  set(MOERT_LINK_LIBS "${MOERT_CKPT_LINK_LIBS};${OPENBLAS_LIB};-lm;-ldl")
endif()
if(MOEC_SANITIZE)
  list(APPEND MOERT_LINK_LIBS "-fsanitize=address,undefined")
endif()
# comm_mpi.c: MPI's headers as SYSTEM (FindMPI's imported target), and its
# libraries for the binaries `moec build` links too (compiler/build.c).
find_package(MPI REQUIRED COMPONENTS C)
target_link_libraries(moert PUBLIC MPI::MPI_C)
list(APPEND MOERT_LINK_LIBS ${MPI_C_LINK_FLAGS} ${MPI_C_LIBRARIES})
set(MOERT_LINK_LIBS "${MOERT_LINK_LIBS}" PARENT_SCOPE)
set(MOERT_INCLUDE_DIR ${CMAKE_CURRENT_SOURCE_DIR} PARENT_SCOPE)

install(TARGETS moert ARCHIVE DESTINATION lib/moec)
install(FILES moert.h model.h DESTINATION include/moec)
