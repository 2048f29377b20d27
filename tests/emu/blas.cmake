# The BLAS stand-ins: libcublas.so.13 (fake_cublas.c) and libcublasLt.so.13
# (fake_cublaslt.c), both on the host GEMM of fake_blas.c (OpenBLAS), and
# their test against naive loops in double (emu.fake_blas), which loads the
# driver stand-in (libcuda.so.1) for its GEMMs in stream capture.
find_path(CBLAS_INCLUDE cblas.h PATH_SUFFIXES openblas openblas-pthread)
find_library(OPENBLAS_LIB openblas)
if(NOT CBLAS_INCLUDE OR NOT OPENBLAS_LIB OR NOT EXISTS ${MOEC_CUDA_INCLUDE}/cublasLt.h)
  emu_missing("OpenBLAS (libopenblas-dev) or cublasLt.h not found" "the cuBLAS stand-ins are not built")
  return()
endif()

add_library(moec_emu_blas STATIC fake_blas.c)
set_target_properties(moec_emu_blas PROPERTIES POSITION_INDEPENDENT_CODE ON C_VISIBILITY_PRESET hidden)
target_include_directories(moec_emu_blas SYSTEM PUBLIC ${MOEC_CUDA_INCLUDE} PRIVATE ${CBLAS_INCLUDE})
target_include_directories(moec_emu_blas PUBLIC ${CMAKE_CURRENT_SOURCE_DIR} PRIVATE ${CMAKE_SOURCE_DIR}/runtime)
target_link_libraries(moec_emu_blas PUBLIC ${OPENBLAS_LIB} m ${CMAKE_DL_LIBS} Threads::Threads)

moec_emu_library(moec_emu_cublas cublas 13 fake_cublas.c)
moec_emu_library(moec_emu_cublaslt cublasLt 13 fake_cublaslt.c)
target_link_libraries(moec_emu_cublas PRIVATE moec_emu_blas)
target_link_libraries(moec_emu_cublaslt PRIVATE moec_emu_blas)

add_executable(test_fake_blas test_fake_blas.c)
target_include_directories(test_fake_blas SYSTEM PRIVATE ${MOEC_CUDA_INCLUDE})
target_link_libraries(test_fake_blas PRIVATE ${CMAKE_DL_LIBS} m)
add_dependencies(test_fake_blas moec_emu_cublas moec_emu_cublaslt moec_emu_cuda)
add_test(NAME emu.fake_blas COMMAND test_fake_blas ${MOEC_EMU_LIB_DIR})
set_tests_properties(emu.fake_blas PROPERTIES LABELS emu)
