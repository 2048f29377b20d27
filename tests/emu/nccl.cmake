# libnccl.so.2 over MPI (fake_nccl.c): NCCL's functions that comm_nccl.c
# calls, one rank per process, built with nccl.h's prototypes. test_fake_nccl
# opens it by path and checks it: under mpirun at 4 ranks (emu.fake_nccl,
# labels emu, mpi) and alone without MPI_Init (emu.fake_nccl.nompi); it loads
# the driver stand-in (libcuda.so.1) for its groups in stream capture.
if(NOT MOEC_NCCL_INCLUDE OR NOT EXISTS ${MOEC_NCCL_INCLUDE}/nccl.h)
  emu_missing("nccl.h not found" "the NCCL stand-in is not built")
  return()
endif()
find_package(MPI REQUIRED COMPONENTS C)

moec_emu_library(moec_emu_nccl nccl 2 fake_nccl.c)
target_include_directories(moec_emu_nccl SYSTEM PRIVATE ${MOEC_NCCL_INCLUDE})
target_link_libraries(moec_emu_nccl PRIVATE MPI::MPI_C ${CMAKE_DL_LIBS} Threads::Threads)

add_executable(test_fake_nccl test_fake_nccl.c)
target_include_directories(test_fake_nccl SYSTEM PRIVATE ${MOEC_NCCL_INCLUDE} ${MOEC_CUDA_INCLUDE})
target_compile_definitions(test_fake_nccl PRIVATE MOEC_EMU_NCCL="${MOEC_EMU_LIB_DIR}/libnccl.so.2"
                           MOEC_EMU_CUDA="${MOEC_EMU_LIB_DIR}/libcuda.so.1")
target_link_libraries(test_fake_nccl PRIVATE MPI::MPI_C ${CMAKE_DL_LIBS})
add_dependencies(test_fake_nccl moec_emu_nccl moec_emu_cuda)

# Open MPI as root, on a small machine: more ranks than cores, no busy wait
# (as tests/mpi; MOEC_MPI_LSAN_ENV: the top-level CMakeLists.txt).
set(EMU_NCCL_ENV OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
    ${MOEC_MPI_LSAN_ENV})
add_test(NAME emu.fake_nccl
         COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} 4 --oversubscribe ${MPIEXEC_PREFLAGS}
                 $<TARGET_FILE:test_fake_nccl> ${MPIEXEC_POSTFLAGS})
set_tests_properties(emu.fake_nccl PROPERTIES ENVIRONMENT "${EMU_NCCL_ENV}" LABELS "emu;mpi" RUN_SERIAL TRUE
                     TIMEOUT 120)

# One process without MPI_Init (a moec binary run with --comm nccl outside
# mpirun): communicators of one rank only.
add_test(NAME emu.fake_nccl.nompi COMMAND $<TARGET_FILE:test_fake_nccl> --no-mpi)
set_tests_properties(emu.fake_nccl.nompi PROPERTIES ENVIRONMENT "${EMU_NCCL_ENV}" LABELS emu TIMEOUT 60)
